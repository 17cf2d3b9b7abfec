"""Weight initialisation, done once on the reference layout so every placement starts equal.

paper   (Krizhevsky 2012): W ~ N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7, else 0.
caffe   (BVLC reference): as paper, but fc6/fc7 W ~ N(0, 0.005) and those biases 0.1,
        because bias 1 can leave the loss flat.
kaiming (He 2015): W ~ N(0, 2 / fan_in) for layers followed by ReLU, N(0, 1 / fan_in) for
        fc8; biases 0. Trains small and deep variants from scratch reliably.
"""
from __future__ import annotations

import math

import torch

from alexnet.reference import ReferenceAlexNet
from alexnet.spec import AlexNetSpec

PAPER_BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")


def init_reference_state(spec: AlexNetSpec, seed: int) -> dict[str, torch.Tensor]:
    """A freshly initialised reference state_dict; the same seed gives the same weights for any placement."""
    gen = torch.Generator().manual_seed(seed)
    model = ReferenceAlexNet(spec)
    state = model.state_dict()
    for name in model.layer_names:
        wkey = next(k for k in state if k.startswith(name + ".") and k.endswith("weight"))
        bkey = wkey[:-len("weight")] + "bias"
        weight, bias = state[wkey], state[bkey]
        fan_in = math.prod(weight.shape[1:])
        if spec.init == "kaiming":
            std, b = math.sqrt((1.0 if name == "fc8" else 2.0) / fan_in), 0.0
        elif spec.init == "caffe":
            std = 0.005 if name in ("fc6", "fc7") else 0.01
            b = 0.1 if name in PAPER_BIAS_ONE else 0.0
        else:
            std, b = 0.01, (1.0 if name in PAPER_BIAS_ONE else 0.0)
        weight.normal_(0.0, std, generator=gen)
        bias.fill_(b)
    return state
