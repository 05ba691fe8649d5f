"""Reading weight files safely and quietly (shared by the open_clip and timm loaders)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
import zipfile
from pathlib import Path

import torch

from fedlit.errors import FedlitError


@contextlib.contextmanager
def quiet():
    """Silence open_clip's root-logger chatter ("No pretrained weights loaded ...") while building."""
    prev = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(prev)


@contextlib.contextmanager
def socket_timeout(seconds: float):
    """A default socket timeout so that a download on a black-holed network fails instead of hanging."""
    prev = socket.getdefaulttimeout()
    if prev is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(prev)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())


def _reason(e: Exception, jit: bool) -> str:
    """Why a file could not be read, in our words: never torch's advice to unpickle it (``weights_only=False``
    runs the file's code), never an empty TorchScript message."""
    import pickle

    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
        return ("it holds pickled Python objects besides tensors, which fedlit never unpickles; save its "
                "state_dict() with safetensors.torch.save_file, or as a plain state dict")
    lines = [ln.strip() for ln in str(e).splitlines() if len(ln.strip().strip("()[]{}")) > 2]
    if jit:
        return f"not a TorchScript archive torch.jit.load can read ({type(e).__name__}" + (
            f": {lines[0][:160]})" if lines else ")")
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a checkpoint file without executing pickled code -> (fp32 state dict, is_openai_torchscript)."""
    path = Path(path).expanduser()
    jit = False
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        elif _is_torchscript(path):  # OpenAI's released ViT-B-16.pt etc.
            jit = True
            with warnings.catch_warnings():  # torch deprecates TorchScript; OpenAI's files still need it
                warnings.simplefilter("ignore", FutureWarning)
                sd = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
            for k in ("input_resolution", "context_length", "vocab_size"):
                sd.pop(k, None)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad user file
        raise FedlitError(f"could not read checkpoint {path} ({_reason(e, jit)}); use a .safetensors file, a plain "
                          "state-dict .pt/.pth/.bin, or an OpenAI TorchScript archive") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise FedlitError(f"checkpoint {path} holds no state dict")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    sd = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in sd.items()}
    return sd, jit
