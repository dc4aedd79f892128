"""Fixtures for the inference engine: the real tiny model, random LoRA adapters built once per session."""

from __future__ import annotations

import os

# Under CPU contention OpenMP's default spin-waiting makes torch several times slower (see tests/training).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import asyncio  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import openai  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from app import db, migrate  # noqa: E402
from app.config import Settings  # noqa: E402
from app.inference import AdapterRef, Finished, GenerationRequest, InferenceEngine, TextDelta  # noqa: E402
from app.main import create_app  # noqa: E402
from app.ml.registry import BaseModelRegistry  # noqa: E402
from app.ml.tiny import build_tiny_model  # noqa: E402
from app.services import keys  # noqa: E402
from tests.inference.adapters import build_random_adapter  # noqa: E402
from tests.inference.families import FamilyCase, build_family_case  # noqa: E402

TINY = "tuneserve-tiny"
EOS_MODEL = "always-eos"


def build_always_eos_model(out_dir: Path) -> Path:
    """A tiny model whose every prediction is EOS: all tokens embed to one vector and the layers add nothing,
    so the final hidden state is constant, and the LM head's EOS row is aligned with it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_model(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    eos = AutoTokenizer.from_pretrained(out_dir).eos_token_id
    with torch.no_grad():
        constant = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        model.model.embed_tokens.weight.copy_(constant.expand_as(model.model.embed_tokens.weight))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight[eos] = constant * 10
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inference")


@pytest.fixture(scope="session")
def registry(models_dir) -> BaseModelRegistry:
    eos_dir = build_always_eos_model(models_dir / "always-eos")
    settings = Settings(data_dir=models_dir / "data", base_models={EOS_MODEL: str(eos_dir)})
    registry = BaseModelRegistry(settings)
    registry.resolve(TINY)  # build the tiny model once, up front
    return registry


@pytest.fixture(scope="session")
def adapters(registry, models_dir) -> list[AdapterRef]:
    """Four adapters of the tiny model with different ranks and targets (one touches attention only)."""
    from transformers import AutoModelForCausalLM

    base_dir = registry.resolve(TINY).name_or_path
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    shapes = [(4, "all-linear"), (8, "all-linear"), (16, ["q_proj", "v_proj"]), (8, "all-linear")]
    refs = []
    for i, (rank, targets) in enumerate(shapes):
        path = build_random_adapter(
            base_dir, models_dir / f"adapter-{i}", seed=100 + i, rank=rank, target_modules=targets, base_model=base
        )
        refs.append(AdapterRef(name=f"ft:{TINY}:test::adapter{i}", path=path))
    return refs


@pytest.fixture
def make_engine(registry):
    """Factory of started engines (on the session's registry unless given another), all stopped at the end of the
    test."""
    engines = []

    def make(registry: BaseModelRegistry = registry, **options) -> InferenceEngine:
        engine = InferenceEngine(registry, **options)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


@pytest.fixture
def engine(make_engine) -> InferenceEngine:
    return make_engine(max_batch_size=16)


@pytest.fixture(scope="session")
def family_cases(registry, tmp_path_factory):
    """`family_cases(family)`: the family's `FamilyCase` (tests/inference/families.py), built on first use."""
    cases: dict[str, FamilyCase] = {}

    def get(family: str) -> FamilyCase:
        if family not in cases:
            cases[family] = build_family_case(registry, family, tmp_path_factory.mktemp(f"family-{family}"))
        return cases[family]

    return get


@pytest.fixture(scope="module")
def client(models_dir, tmp_path_factory) -> Iterator[TestClient]:
    """The app on SQLite, its data dir the session's (the family models are built once), one project's key."""
    url = f"sqlite:///{tmp_path_factory.mktemp('api') / 'api.db'}"
    migrate.upgrade(url)
    engine = db.make_engine(url)
    with db.session_scope(db.make_sessionmaker(engine)) as session:
        key = keys.create_key(session, "inference")
    engine.dispose()
    with TestClient(create_app(Settings(data_dir=models_dir / "data", database_url=url))) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        yield client


@pytest.fixture(scope="module")
def sdk(client) -> openai.OpenAI:
    """The openai SDK talking to `client`'s app in-process."""
    key = client.headers["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=key, http_client=client, max_retries=0)


@pytest.fixture(scope="session")
def tokenizer(registry):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(registry.resolve(TINY).name_or_path)


def prompt_ids(tokenizer, text: str) -> list[int]:
    from app.ml.chat import render_completion_prompt

    return render_completion_prompt(text, tokenizer)


def request(tokenizer, text: str, adapter: AdapterRef | None = None, **options) -> GenerationRequest:
    options.setdefault("max_tokens", 12)
    options.setdefault("temperature", 0.0)
    return GenerationRequest(
        base_model=options.pop("base_model", TINY), adapter=adapter, prompt_ids=prompt_ids(tokenizer, text), **options
    )


async def collect(handle) -> tuple[str, Finished]:
    """The whole text of a handle and its Finished event (checking the event protocol on the way)."""
    text, finished = "", None
    async for event in handle:
        assert finished is None, "nothing may follow Finished"
        if isinstance(event, TextDelta):
            assert event.text or event.logprobs, "a delta carries text, or the logprobs of tokens without text"
            text += event.text
        else:
            assert isinstance(event, Finished)
            finished = event
    assert finished is not None
    return text, finished


def run_together(engine: InferenceEngine, requests: list[GenerationRequest]) -> list[tuple[str, Finished]]:
    """Submit all requests from one event loop at once and wait for every result."""

    async def main():
        handles = [engine.submit(r) for r in requests]
        return await asyncio.gather(*(collect(h) for h in handles))

    return asyncio.run(main())


def run_one_by_one(engine: InferenceEngine, requests: list[GenerationRequest]) -> list[tuple[str, Finished]]:
    return [run_together(engine, [r])[0] for r in requests]
