"""ffc IR: op kinds, types, graphs, text form, verifier and reference interpreter."""
from .graph import Graph, Module, Node, Param, ParamRef, Recipe
from .interpreter import materialize_params, run_graph
from .ops import REGISTRY, Estimate, Op
from .text import parse, print_graph, print_module
from .types import TensorType, parse_type
from .verify import VerifyError, verify_module

__all__ = ["Graph", "Module", "Node", "Param", "ParamRef", "Recipe", "materialize_params", "run_graph",
           "REGISTRY", "Estimate", "Op", "parse", "print_graph", "print_module", "TensorType",
           "parse_type", "VerifyError", "verify_module"]
