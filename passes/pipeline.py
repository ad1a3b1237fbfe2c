"""The ordered pass pipeline: this list is the compiler."""
from .apply_tensor_parallel import apply_tensor_parallel
from .eliminate_common_subexpressions import eliminate_common_subexpressions
from .eliminate_dead_code import eliminate_dead_code
from .fold_constants import fold_constants
from .fuse_gate_up import fuse_gate_up
from .fuse_qkv import fuse_qkv
from .insert_kv_cache import insert_kv_cache
from .quantize_weights import quantize_weights
from .raise_attention import raise_attention
from .raise_glu import raise_glu
from .raise_moe_route import raise_moe_route
from .raise_rms_norm import raise_rms_norm
from .raise_rope import raise_rope
from .remove_noops import remove_noops
from .search_parallel_strategy import search_parallel_strategy
from .select_logits import select_logits
from .set_weight_dtype import set_weight_dtype
from .split_grouped_projections import split_grouped_projections
from .split_pipeline_stages import split_pipeline_stages

PIPELINE = [
    # clean-up
    remove_noops,
    eliminate_dead_code,
    fold_constants,
    eliminate_common_subexpressions,
    split_grouped_projections,
    # raise ATen-level patterns to LLM ops
    raise_rms_norm,
    raise_rope,
    raise_attention,
    raise_glu,
    raise_moe_route,
    eliminate_dead_code,
    # parallelization: a strategy searched by cost model (a decision, given by the compiler), applied
    search_parallel_strategy,
    apply_tensor_parallel,
    # horizontal fusion (weights concatenated at compile time)
    fuse_qkv,
    fuse_gate_up,
    # KV cache: prefill and decode graphs over a preallocated cache
    insert_kv_cache,
    select_logits,
    # storage of weights: quantized blocks (--quant), else --dtype; computation stays fp32
    quantize_weights,
    set_weight_dtype,
    # pipeline parallelism: one graph per stage (the search chose the layers of each)
    split_pipeline_stages,
]


# the steps before the strategy search: what a dry run plans on
SEARCH_POINT = PIPELINE.index(search_parallel_strategy)


def pipeline_until_search() -> list:
    return PIPELINE[:SEARCH_POINT]


def pass_names() -> list[str]:
    return [p.__name__ for p in PIPELINE]
