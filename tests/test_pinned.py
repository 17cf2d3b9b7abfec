"""The README's cross-group figures, pinned: MB per step of the Fashion-MNIST AlexNet at batch 128 for each
config the study tables list, counted by the layers themselves (not by a second encoding of the rule), and
the layers counted are exactly the ones that exchange."""
import pytest
import torch

from alexnet.build import spec_from_config
from alexnet.config import load
from alexnet.model import GroupAlexNet
from parallel import LocalPlacement

# README, "What the study shows" and the topology table: cross-group MB/step
README_MB = {"g2": 1.77, "g3": 3.55, "g4": 5.32, "g4_own": 2.67, "g4_shuffle": 3.33, "root": 0.89}
EXCHANGING = {"g2": {"conv3", "fc6", "fc7", "fc8", "logits"}, "g4_own": {"fc6", "fc7", "fc8", "logits"},
              "root": {"fc6", "fc7", "fc8", "logits"}}


@pytest.mark.parametrize("config", list(README_MB))
def test_cross_group_megabytes_per_step_are_the_readmes(config):
    spec = spec_from_config(load(f"configs/fashion_mnist/{config}.yaml"))
    model = GroupAlexNet(spec, LocalPlacement(spec.slot_groups, ["cpu"]))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(128, 1, 32, 32))
    counted = model.placement.counter.snapshot()
    assert round(model.placement.counter.total() / 1e6, 2) == README_MB[config]
    layers = {key.rsplit("/", 1)[0] for key, n in counted.items() if n}
    assert layers == EXCHANGING.get(config, {"conv3", "fc6", "fc7", "fc8", "logits"})
