"""Reading and writing torch files (the official SSD checkpoints are torch files whatever the Keras
backend; torch is a core dependency)."""

from __future__ import annotations


def load_torch_file(path):
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers
    only, no code is unpickled. The official SSD checkpoints are torch files whatever the
    Keras backend; torch is a core dependency. Exceptions propagate unchanged."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def save_torch_state_dict(arrays, file) -> None:
    """``torch.save`` of a state_dict made of the numpy ``arrays`` (name -> array, in
    order) into the binary ``file``: what ``load_state_dict`` of a torch module reads."""
    import numpy as np
    import torch

    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, file)


def torch_tensor_to_numpy(value):
    """A float32 numpy copy of a torch tensor, or ``None`` if ``value`` is no tensor."""
    import torch

    if not torch.is_tensor(value):
        return None
    return value.detach().to(torch.float32).numpy()
