"""Every registered loss passes the conformance kit that plugin authors use."""

from __future__ import annotations

import pytest

from lossforge.testing import CHECKS, check_loss, parametrize_losses


@parametrize_losses()
def test_check_loss(loss_name):
    ran = check_loss(loss_name)
    assert {"gradient", "grad_output", "unchanged", "threads", "bad_input", "float16"} <= set(ran)


def test_check_loss_reports_a_broken_loss(monkeypatch):
    import lossforge as lf

    loss = lf.get("mse_loss")
    reference = loss.spec.reference
    broken = type(loss.spec)(
        **{**loss.spec.__dict__, "reference": lambda x, y, **_: 2 * reference(x, y)}
    )
    monkeypatch.setattr(loss, "spec", broken)
    with pytest.raises(AssertionError, match=r"check_loss\('mse_loss'\): reference: float64 value"):
        check_loss("mse_loss", checks=["reference"])
    assert "cuda" in CHECKS
