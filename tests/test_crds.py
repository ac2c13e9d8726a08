"""The checked-in CRDs are exactly what the one schema generates."""

from pathlib import Path

import pytest

from kubetune.api import crd

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("target", crd.TARGETS)
@pytest.mark.parametrize("name", sorted(crd.FILES))
def test_checked_in_crd_matches_the_schema(target, name):
    assert (ROOT / target / name).read_text() == crd.render(name), (
        f"{target}/{name} is stale: run `python -m kubetune.api.crd`")


def test_the_crd_schema_is_structural_not_preserve_everything():
    spec = crd.experiment_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert "x-kubernetes-preserve-unknown-fields" not in spec
    param = spec["properties"]["parameters"]["items"]
    assert param["properties"]["type"]["enum"] == ["double", "int", "categorical", "discrete"]
    assert any("self.max > self.min" in rule["rule"] for rule in param["x-kubernetes-validations"])


def test_kubectl_get_experiments_shows_the_paused_trials():
    """With HyperBand most trials wait Paused between rungs: without the column the counts shown summed to
    far fewer than the trials, and an experiment whose trials all waited looked idle."""
    columns = crd.experiment_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    assert {"name": "Paused", "type": "integer", "jsonPath": ".status.paused"} in columns
