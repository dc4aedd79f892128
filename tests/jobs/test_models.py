"""/v1/models over published fine-tuned models: listing, isolation, deletion, adapter download."""

from __future__ import annotations

import io
import tarfile

import pytest

from worker.runner import run_job

pytestmark = pytest.mark.slow


@pytest.fixture
def fine_tuned(client, ctx, create_job) -> dict:
    job_id = create_job(suffix="m", n_checkpoints=1)
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


def test_another_projects_models_are_404(app_client, fine_tuned, beta_key):
    model = fine_tuned["fine_tuned_model"]
    beta = {"Authorization": f"Bearer {beta_key}"}
    for method, path in [("GET", f"/v1/models/{model}"), ("GET", f"/v1/models/{model}/adapter"),
                         ("DELETE", f"/v1/models/{model}")]:  # fmt: skip
        assert app_client.request(method, path, headers=beta).status_code == 404, (method, path)
    assert model not in {m["id"] for m in app_client.get("/v1/models", headers=beta).json()["data"]}
    # Nor can beta continue training from it.
    r = app_client.post("/v1/fine_tuning/jobs", headers=beta, json={"model": model, "training_file": "file-x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
