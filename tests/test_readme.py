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


def readme_commands(root) -> list[str]:
    """The commands of the README's "Two commands" block, comments stripped."""
    block = re.search(r"## Two commands\s*```bash\n(.*?)```", readme(root), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command(root):
    assert readme_commands(root) == ["make demo", "make test"]
    ci = open(os.path.join(root, ".ci", "run")).read()
    assert re.search(r"^make test$", ci, re.M)


def test_make_test_installs_everything_it_runs_with(root, tmp_path):
    """On a machine without the virtualenv, ``make test`` makes it, installs the tested torch and the
    project with its test extras, checks the tools, then runs pytest from it: in that order."""
    import subprocess
    venv = tmp_path / "venv"
    plan = subprocess.run(["make", "-n", "test", f"VENV={venv}"], cwd=root, capture_output=True, text=True,
                          check=True).stdout
    steps = [f"-m venv {venv}", "pip install -q torch==2.14.1 torchvision==0.29.1", 'pip install -q -e ".[test]"',
             "command -v cc", "command -v pgrep", f"{venv}/bin/python -m pytest"]
    at = [plan.find(step) for step in steps]
    assert -1 not in at and at == sorted(at), dict(zip(steps, at))
