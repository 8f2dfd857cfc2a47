"""ShiftAddViT building blocks and the reparameterisation of timm ViTs."""

from models.assignment import Assignment
from models.costs import ExpertCostModel
from models.errors import AssignmentError, CheckpointError, ModelError
from models.hamming import HammingAttention, PvtHammingAttention, fit_hamming
from models.moe import (
    MoELinear,
    equilibrium_share,
    moe_balance_loss,
    moe_layers,
    routing_shares,
    set_moe_capacity,
)
from models.ops import kernel_ops, set_kernel_ops
from models.registry import (
    check_name,
    create,
    input_size,
    load_resized,
    load_weights,
    names,
    read_checkpoint,
    register_model,
    state_dict_of,
)
from models.reparam import apply_costs, reparameterize
from models.shift import ShiftLinear

__all__ = [
    "Assignment", "AssignmentError", "CheckpointError", "ExpertCostModel", "HammingAttention", "ModelError",
    "MoELinear", "PvtHammingAttention", "ShiftLinear", "apply_costs", "check_name", "create", "equilibrium_share",
    "fit_hamming", "kernel_ops",
    "load_weights", "moe_balance_loss", "moe_layers", "names", "read_checkpoint", "register_model",
    "reparameterize", "routing_shares", "set_kernel_ops", "set_moe_capacity", "state_dict_of",
    "input_size", "load_resized",
]
