"""Learning-rate schedules and checkpoint compatibility: the small pieces a resumed run depends on."""
import pytest

from alexnet.checkpoint import CheckpointError, check_compatible
from alexnet.config import load
from alexnet.schedule import LRSchedule


def test_paper_schedule_divides_by_ten_on_plateaus_at_most_max_drops_times():
    s = LRSchedule("paper", 0.01, epochs=90, steps_per_epoch=10, patience=2, max_drops=2)
    lrs = []
    for err in (50, 40, 41, 42, 39, 39.5, 39.6, 39.7, 39.8, 39.9, 40.0):
        lrs.append(s.lr(0, 0))
        s.end_epoch(err)
    # improvements at epochs 1, 2, 5; plateaus of 2 epochs drop after epochs 4 and 7; then capped at 2 drops
    assert lrs == pytest.approx([0.01] * 4 + [0.001] * 3 + [0.0001] * 4)
    restored = LRSchedule("paper", 0.01, 90, 10, patience=2, max_drops=2)
    restored.load_state_dict(s.state_dict())
    assert restored.lr(0, 0) == s.lr(0, 0) and restored.state_dict() == s.state_dict()


def test_step_cosine_and_warmup():
    step = LRSchedule("step", 0.1, epochs=90, steps_per_epoch=10, step_size=30, gamma=0.1)
    assert [step.lr(0, e) for e in (0, 29, 30, 60)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    cos = LRSchedule("cosine", 0.1, epochs=2, steps_per_epoch=10)
    assert cos.lr(0, 0) == pytest.approx(0.1) and cos.lr(10, 1) == pytest.approx(0.05)
    assert cos.lr(20, 1) == pytest.approx(0.0, abs=1e-12)
    warm = LRSchedule("cosine", 0.1, epochs=4, steps_per_epoch=10, warmup_epochs=1)
    assert [warm.lr(s, 0) for s in (0, 4, 9)] == pytest.approx([0.01, 0.05, 0.1])
    assert warm.lr(10, 1) == pytest.approx(0.1) and warm.lr(25, 2) == pytest.approx(0.05)
    assert LRSchedule("constant", 0.3, 5, 10).lr(33, 3) == 0.3


@pytest.mark.parametrize("override", ["model.groups=4", "model.kernels=[3,3,3,3,5]", "model.strides=[3,1,1,1,1]",
                                      "model.paddings=[1,1,1,1,0]", "model.lrn=false", "model.num_classes=7",
                                      "model.exchange.conv3=own", "model.groups=[2,2,2,2,2]"])
def test_checkpoint_of_another_model_is_refused_naming_the_key(override):
    saved = load("configs/smoke.yaml")
    ckpt = {"config": saved}
    key = ".".join(override.split("=")[0].split(".")[:2])
    with pytest.raises(CheckpointError, match=f"{key}="):
        check_compatible(ckpt, load("configs/smoke.yaml", [override])["model"], "x.pt")
    check_compatible(ckpt, load("configs/smoke.yaml", ["model.dropout=0.1"])["model"], "x.pt")  # not the weights
