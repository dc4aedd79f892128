"""/v1/models over published fine-tuned models: listing, isolation, deletion, adapter download."""

from __future__ import annotations

import io
import tarfile

import pytest
from sqlalchemy import select

from app.tables import FineTunedModel
from worker.runner import run_job

pytestmark = pytest.mark.slow


@pytest.fixture
def fine_tuned(client, ctx, create_job) -> dict:
    job_id = create_job(suffix="m", n_checkpoints=2)  # 10 steps: checkpoint models at steps 5 and 10
    assert run_job(ctx, job_id) == "succeeded"
    return client.get(f"/v1/fine_tuning/jobs/{job_id}").json()


def test_list_and_retrieve(client, fine_tuned):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["tuneserve-tiny"]["owned_by"] == "system"
    model = fine_tuned["fine_tuned_model"]
    assert models[model] == {"id": model, "object": "model", "created": models[model]["created"], "owned_by": "alpha"}
    assert f"{model}:ckpt-step-10" in models  # the checkpoint is a model too
    assert client.get(f"/v1/models/{model}").json()["id"] == model
    assert client.get("/v1/models/tuneserve-tiny").json()["owned_by"] == "system"
    r = client.get("/v1/models/no-such-model")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_adapter_download_loads_with_peft(client, ctx, fine_tuned, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r = client.get(f"/v1/models/{fine_tuned['fine_tuned_model']}/adapter")
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        assert sorted(tar.getnames()) == ["adapter_config.json", "adapter_model.safetensors"]
        tar.extractall(tmp_path / "adapter", filter="data")
    base = AutoModelForCausalLM.from_pretrained(ctx.registry.resolve("tuneserve-tiny").name_or_path)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())
    assert client.get("/v1/models/tuneserve-tiny/adapter").status_code == 404


def test_delete(client, fine_tuned, ctx):
    model = fine_tuned["fine_tuned_model"]
    assert client.delete(f"/v1/models/{model}").json() == {"id": model, "object": "model", "deleted": True}
    assert client.get(f"/v1/models/{model}").status_code == 404
    assert client.get(f"/v1/models/{model}/adapter").status_code == 404
    assert client.delete(f"/v1/models/{model}").status_code == 404
    assert model not in {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert client.delete("/v1/models/tuneserve-tiny").status_code == 400


def test_deleting_a_model_takes_its_checkpoint_models_and_a_checkpoint_model_goes_alone(client, ctx, fine_tuned):
    model = fine_tuned["fine_tuned_model"]
    first, last = f"{model}:ckpt-step-5", f"{model}:ckpt-step-10"
    with ctx.sessionmaker() as session:
        keys = {m.id: m.storage_key for m in session.scalars(select(FineTunedModel))}
    engine = client.app.state.inference

    def listed() -> set[str]:
        return {m["id"] for m in client.get("/v1/models").json()["data"]}

    def served(name: str) -> int:
        return client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2}).status_code

    assert {model, first, last} <= listed()
    assert served(first) == served(last) == 200 and {first, last} <= set(engine.resident_adapters())

    # A checkpoint model may be deleted alone: the final model and the other checkpoint stay.
    assert client.delete(f"/v1/models/{first}").json() == {"id": first, "object": "model", "deleted": True}
    assert first not in listed() and {model, last} <= listed()
    assert served(last) == 200 and served(model) == 200

    # The final model is the job's output: deleting it deletes the job's checkpoint models with it.
    assert client.delete(f"/v1/models/{model}").json() == {"id": model, "object": "model", "deleted": True}
    assert not {model, first, last} & listed()
    assert not {model, first, last} & set(engine.resident_adapters())
    for gone in (model, first, last):
        assert client.get(f"/v1/models/{gone}").status_code == 404, gone
        assert client.get(f"/v1/models/{gone}/adapter").status_code == 404, gone
        assert served(gone) == 404, gone
        assert client.delete(f"/v1/models/{gone}").status_code == 404, gone
        assert not ctx.storage.dir_exists(keys[gone]), gone


def test_another_projects_models_are_404(app_client, fine_tuned, beta_key):
    model = fine_tuned["fine_tuned_model"]
    beta = {"Authorization": f"Bearer {beta_key}"}
    for method, path in [
        ("GET", f"/v1/models/{model}"),
        ("GET", f"/v1/models/{model}/adapter"),
        ("DELETE", f"/v1/models/{model}"),
    ]:
        assert app_client.request(method, path, headers=beta).status_code == 404, (method, path)
    assert model not in {m["id"] for m in app_client.get("/v1/models", headers=beta).json()["data"]}
    # Nor can beta continue training from it.
    r = app_client.post("/v1/fine_tuning/jobs", headers=beta, json={"model": model, "training_file": "file-x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
