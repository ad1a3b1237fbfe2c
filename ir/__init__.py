"""ffc IR: op kinds, types, graphs, text form, verifier and reference interpreter."""
from .graph import Graph, Module, Node, Origin, Param, ParamRef, Recipe
from .interpreter import materialize_params, run_graph
from .ops import REGISTRY, Comm, Estimate, Op
from .text import parse, print_graph, print_module
from .types import DType, Placement, TensorType, parse_type
from .verify import VerifyError, verify_module

__all__ = ["Graph", "Module", "Node", "Origin", "Param", "ParamRef", "Recipe", "materialize_params", "run_graph",
           "REGISTRY", "Comm", "Estimate", "Op", "parse", "print_graph", "print_module", "TensorType", "DType", "Placement",
           "parse_type", "VerifyError", "verify_module"]
