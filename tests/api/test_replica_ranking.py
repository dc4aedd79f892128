"""Rendezvous ranking of inference replicas: models spread over the replicas, and a change of replicas moves only
the models it must (an adapter stays hot where it is otherwise)."""

from __future__ import annotations

import pytest

from app.api.replicas import rank
from app.config import SettingsError, load_settings

MODELS = [f"ft:tuneserve-tiny:project:{i}:ftjob-{i:04d}" for i in range(2000)]
REPLICAS = [f"http://inference-{i}:8000" for i in range(4)]


def owners(replicas: list[str]) -> dict[str, str]:
    return {model: rank(replicas, model)[0] for model in MODELS}


def test_models_spread_evenly_and_the_ranking_is_stable():
    placed = owners(REPLICAS)
    for replica in REPLICAS:
        assert 0.2 < sum(owner == replica for owner in placed.values()) / len(MODELS) < 0.3
    assert owners(list(reversed(REPLICAS))) == placed  # the order of the list does not matter


def test_a_replica_leaving_moves_only_its_models_and_one_joining_takes_only_its_share():
    placed = owners(REPLICAS)
    without = owners(REPLICAS[1:])
    moved = [m for m in MODELS if without[m] != placed[m]]
    assert moved == [m for m in MODELS if placed[m] == REPLICAS[0]]
    # Each of the leaver's models goes to the replica that ranked second for it.
    assert all(without[m] == rank(REPLICAS, m)[1] for m in moved)

    joined = owners([*REPLICAS, "http://inference-4:8000"])
    taken = [m for m in MODELS if joined[m] != placed[m]]
    assert all(joined[m] == "http://inference-4:8000" for m in taken)
    assert 0.15 < len(taken) / len(MODELS) < 0.25  # about a fifth


def test_replicas_without_the_internal_token_are_refused():
    with pytest.raises(SettingsError, match="TUNESERVE_INTERNAL_TOKEN"):
        load_settings(inference_replicas=["http://inference-0:8000"])
