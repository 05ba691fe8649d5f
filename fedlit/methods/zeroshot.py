"""Zero-shot CLIP: a fixed hand-crafted template per class, nothing trained, nothing sent.

FedPGP and FedOTP evaluate "a photo of a {class}." for every dataset (spec §1.5); CoOp's per-dataset
templates can be passed as ``template``.
"""

from __future__ import annotations

from ..prompts import Task, handcrafted_features
from .base import FedMethod


class ZeroShot(FedMethod):
    """Zero-shot CLIP.

    Args:
        template: a format string with one ``{}`` for the class name.
    """

    name = "zeroshot"
    default_augment = "none"  # nothing is trained
    trainable = False

    def __init__(self, template: str = "a photo of a {}."):
        super().__init__()
        if "{}" not in template:
            from ..errors import FedlitError

            raise FedlitError(f"zeroshot template '{template}' needs a '{{}}' where the class name goes")
        self.template = template

    def text_features(self, prompt, clip, task: Task):
        return handcrafted_features(clip, task, self.template)
