"""The README's promises: the parallel/ example runs, the test command is what CI runs."""
import os
import re

import torch


def readme(root) -> str:
    return open(os.path.join(root, "README.md")).read()


def test_readme_toy_example_runs_and_matches_grouped_reference(root, capsys):
    code = re.search(r"<!-- toy-example -->\s*```python\n(.*?)```", readme(root), re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    logits, layers, placement = scope["logits"], scope["layers"], scope["placement"]
    assert logits.shape == (8, 10)
    # the same network in plain torch, with the toy's weights: conv1 dense, conv2 groups=2, conv3 a channel
    # shuffle then groups=2, conv4 groups=4, fc dense
    from alexnet.reference import ChannelShuffle
    refs = [torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 3, padding=1, groups=2),
            torch.nn.Conv2d(32, 32, 3, padding=1, groups=2), torch.nn.Conv2d(32, 32, 1, groups=4),
            torch.nn.Linear(32, 10)]
    with torch.no_grad():
        for ref, ours in zip(refs, (layers[0], layers[2], layers[3], layers[4], layers[6])):
            ref.weight.copy_(torch.cat(list(ours.weights)))
            ref.bias.copy_(torch.cat(list(ours.biases)))
    conv1, conv2, conv3, conv4, fc = refs
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    maps = conv4(conv3(ChannelShuffle(2)(conv2(torch.relu(conv1(x))))))
    expected = fc(torch.nn.functional.adaptive_avg_pool2d(maps, 1).flatten(1))
    y = x
    for layer in layers:
        y = layer(y)
    got = scope["gather_output"](placement, y)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert placement.counter.snapshot()["fc/fwd"] > 0 and placement.counter.by_module(layers)["3/fwd"] > 0


def test_ci_runs_the_readme_test_command(root):
    assert "make test" in readme(root)
    ci = open(os.path.join(root, ".ci", "run")).read()
    assert re.search(r"^make test$", ci, re.M)
