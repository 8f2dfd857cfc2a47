"""ShiftAddViT building blocks and the reparameterisation of timm ViTs."""

from models.errors import AssignmentError, CheckpointError, ModelError
from models.registry import create, load_weights, names, read_checkpoint, register_model, state_dict_of
