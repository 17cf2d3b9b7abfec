"""A user's script on parallel/ under torchrun that never tears anything down (tests/test_teardown.py runs it).

It starts with ``init_from_env``, computes a grouped 3x3 convolution between two all-gathering
1x1 convolutions (a ResNeXt bottleneck's pattern), checks it against the single-device twin,
and simply ends: no barrier, no destroy_process_group, no os._exit.
"""
import sys

import torch
from torch import nn

from parallel import GroupConv2d, full_state_dict, gather_output, shard
from parallel.distributed import init_from_env

placement, runtime = init_from_env(2, "gloo")
torch.manual_seed(0)
layers = nn.Sequential(GroupConv2d(placement, 8, 8, 1, exchange="all", name="a", bias=False),
                       GroupConv2d(placement, 8, 8, 3, padding=1, exchange="own", name="b", bias=False),
                       GroupConv2d(placement, 8, 8, 1, exchange="all", name="c", bias=False)).double()
twin = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False),
                     nn.Conv2d(8, 8, 1, bias=False)).double()
twin.load_state_dict({k.replace("a.", "0.").replace("b.", "1.").replace("c.", "2."): v
                      for k, v in full_state_dict(layers).items()})
x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
y = gather_output(placement, layers(shard(x, placement)))
y.square().sum().backward()
twin(x).square().sum().backward()
torch.testing.assert_close(y, twin(x))
grads = full_state_dict(layers, lambda p: p.grad)
for key, value in grads.items():
    torch.testing.assert_close(value, dict(twin.named_parameters())[key.replace("a.", "0.").replace("b.", "1.")
                                                                     .replace("c.", "2.")].grad)
print(f"rank {runtime.process_index}: exact", flush=True)
sys.exit(0)
