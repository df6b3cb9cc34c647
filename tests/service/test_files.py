"""/v1/files and /v1/fine_tuning/jobs through the official `openai` SDK, in process.

The SDK's HTTP client is FastAPI's TestClient (an httpx.Client), so these are the SDK's real
requests and its real error handling, without a server process; a job run end to end through
a live server is in test_openai_sdk.py.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from charter.service.api import build_app
from charter.service.auth import Principal, current_principal

from .helpers import make_settings

SFT = [
    {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}"}]} for i in range(4)
]
PREFS = [{"prompt": f"Say {i}", "chosen": f"{i}", "rejected": "no"} for i in range(4)]
# OpenAI's reinforcement format: messages ending with the user's turn, other fields for the grader.
RFT = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)} for i in range(4)]
CHECK = {
    "type": "string_check",
    "name": "exact answer",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory, tiny_model: str) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("files")
    settings = make_settings(tmp, f"sqlite:///{tmp / 'charter.db'}", max_upload_bytes=4096)
    with TestClient(build_app(settings, start_worker=False)) as c:
        yield c


@pytest.fixture
def sdk(app_client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=app_client, max_retries=0)


def test_upload_list_retrieve_content_delete(sdk: openai.OpenAI, app_client: TestClient) -> None:
    f = sdk.files.create(file=("sft.jsonl", io.BytesIO(jsonl(SFT))), purpose="fine-tune")
    assert f.id.startswith("file-") and f.object == "file" and f.status == "processed"
    assert (f.filename, f.purpose, f.bytes) == ("sft.jsonl", "fine-tune", len(jsonl(SFT)))
    assert isinstance(f.created_at, int)
    assert f.model_extra == {"kind": "sft", "rows": 4}
    assert f.id in [x.id for x in sdk.files.list()]
    assert sdk.files.retrieve(f.id).model_dump() == f.model_dump()
    assert sdk.files.content(f.id).read() == jsonl(SFT)
    stored = app_client.app.state.settings.artifact_root / "files" / f.id
    assert stored.read_bytes() == jsonl(SFT)
    assert not [p for p in stored.parent.iterdir() if p.name.startswith(".tmp")]  # temp names renamed or removed

    deleted = sdk.files.delete(f.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (f.id, "file", True)
    assert not stored.exists()
    with pytest.raises(openai.NotFoundError) as e:
        sdk.files.retrieve(f.id)
    assert e.value.body["type"] == "invalid_request_error" and f.id in e.value.body["message"]


def test_bad_dataset_names_the_first_bad_line(sdk: openai.OpenAI, app_client: TestClient) -> None:
    before = sdk.files.list().data
    bad = jsonl(PREFS[:2]) + b'{"prompt": "x", "chosen": "y"}\n' + jsonl(PREFS[2:])
    with pytest.raises(openai.BadRequestError) as e:
        sdk.files.create(file=("prefs.jsonl", bad), purpose="fine-tune")
    err = e.value.body
    assert err["param"] == "file" and err["code"] == "invalid_file_format"
    assert err["message"].startswith("prefs.jsonl: line 3:") and "'rejected' is missing" in err["message"]
    assert sdk.files.list().data == before  # nothing stored
    assert not list((app_client.app.state.settings.artifact_root / "files").glob(".tmp*"))


def test_purpose_and_size_limit(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        sdk.files.create(file=("sft.jsonl", jsonl(SFT)), purpose="batch")
    assert e.value.body["param"] == "purpose" and "fine-tune, constitution" in e.value.body["message"]
    with pytest.raises(openai.APIStatusError) as e:
        sdk.files.create(file=("big.jsonl", jsonl(SFT * 40)), purpose="fine-tune")  # over the 4096-byte test limit
    assert e.value.status_code == 413 and "CHARTER_MAX_UPLOAD_BYTES" in e.value.body["message"]


def test_constitution_upload_uses_the_loader(sdk: openai.OpenAI) -> None:
    hf = (Path(__file__).parents[2] / "charter" / "constitution" / "hf-cai-example.json").read_bytes()
    f = sdk.files.create(file=("cai.json", hf), purpose="constitution")
    assert f.model_extra["kind"] == "constitution"
    with pytest.raises(openai.BadRequestError) as e:
        sdk.files.create(file=("c.yaml", b"principles: []\n"), purpose="constitution")
    assert e.value.body["code"] == "invalid_constitution" and "principles" in e.value.body["message"]


def test_another_tenants_files_are_not_found(app_client: TestClient, sdk: openai.OpenAI) -> None:
    app = app_client.app
    try:
        app.dependency_overrides[current_principal] = lambda: Principal(tenant="alice")
        mine = sdk.files.create(file=("sft.jsonl", jsonl(SFT)), purpose="fine-tune")
        app.dependency_overrides[current_principal] = lambda: Principal(tenant="bob")
        assert mine.id not in [f.id for f in sdk.files.list()]
        for call in (sdk.files.retrieve, sdk.files.content, sdk.files.delete):
            with pytest.raises(openai.NotFoundError):
                call(mine.id)
        r = app_client.post(
            "/v1/jobs",
            json={"name": "x", "policy": {"model": "tiny"}, "dataset": {"source": mine.id}, "train": {"method": "sft"}},
        )
        assert r.status_code == 422 and "no file with id" in r.text
        app.dependency_overrides[current_principal] = lambda: Principal(tenant="admin", admin=True)
        assert sdk.files.retrieve(mine.id).id == mine.id  # an admin sees every tenant's files
    finally:
        app.dependency_overrides.clear()


def test_job_specs_reference_uploaded_files(sdk: openai.OpenAI, app_client: TestClient) -> None:
    prompts = sdk.files.create(file=("p.jsonl", b'{"prompt": "Hello?"}\n'), purpose="fine-tune")
    prefs = sdk.files.create(file=("prefs.jsonl", jsonl(PREFS)), purpose="fine-tune")
    base = {"name": "ref", "policy": {"model": "tiny"}}
    r = app_client.post("/v1/jobs", json={**base, "prompts": {"source": prompts.id}, "train": {"method": "sft"}})
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["prompts"]["source"] == prompts.id  # the stored spec keeps the id
    r = app_client.post("/v1/jobs", json={**base, "dataset": {"source": prefs.id}, "train": {"method": "dpo"}})
    assert r.status_code == 201, r.text
    # a preference file cannot feed sft: the field and the fix are named
    r = app_client.post("/v1/jobs", json={**base, "dataset": {"source": prefs.id}, "train": {"method": "sft"}})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["dataset", "source"] and "needs a sft dataset" in r.text
    r = app_client.post("/v1/jobs", json={**base, "train": {"method": "sft"}})
    assert r.status_code == 422 and "exactly one of prompts" in r.text


def test_fine_tuning_validation_errors_through_the_sdk(sdk: openai.OpenAI) -> None:
    prefs = sdk.files.create(file=("prefs.jsonl", jsonl(PREFS)), purpose="fine-tune")
    sft = sdk.files.create(file=("sft.jsonl", jsonl(SFT)), purpose="fine-tune")
    cases = [
        (dict(model="tiny", training_file="file-doesnotexist"), "training_file", "no file with id"),
        (dict(model="no-such-model", training_file=sft.id), "model", "no-such-model"),
        (dict(model="tiny", training_file=prefs.id, method={"type": "supervised"}), "training_file", "needs a sft"),
        (
            dict(model="tiny", training_file=sft.id, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}),
            "training_file",
            "needs a preference",
        ),
        (
            dict(model="tiny", training_file=sft.id, extra_body={"charter": {"args": {"no_such_key": 1}}}),
            "method.supervised.hyperparameters",
            "no_such_key",
        ),
        (dict(model="tiny", training_file=sft.id, validation_file=prefs.id), "validation_file", "needs a sft"),
        (
            dict(
                model="tiny",
                training_file=sft.id,
                method={"type": "supervised", "supervised": {"hyperparameters": {"eval_interval": 2}}},
            ),
            "method.supervised.hyperparameters.eval_interval",
            "needs a validation_file",
        ),
        (
            dict(model="tiny", training_file=sft.id, hyperparameters={"learning_rate_multiplier": -1}),
            "hyperparameters.learning_rate_multiplier",
            "greater than 0",
        ),
        (dict(model="tiny", training_file=sft.id, extra_body={"epochs": 3}), "epochs", "Extra inputs"),
    ]
    before = len(sdk.fine_tuning.jobs.list(limit=100).data)
    for kwargs, param, fragment in cases:
        with pytest.raises(openai.BadRequestError) as e:
            sdk.fine_tuning.jobs.create(**kwargs)
        assert e.value.body["param"] == param, (kwargs, e.value.body)
        assert fragment in e.value.body["message"], (kwargs, e.value.body)
    assert len(sdk.fine_tuning.jobs.list(limit=100).data) == before  # nothing queued


def test_fine_tuning_create_maps_hyperparameters(sdk: openai.OpenAI, app_client: TestClient) -> None:
    prefs = sdk.files.create(file=("prefs.jsonl", jsonl(PREFS)), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model="tiny",
        training_file=prefs.id,
        method={
            "type": "dpo",
            "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2, "learning_rate_multiplier": 10}},
        },
        seed=7,
        suffix="mine",
        metadata={"team": "a"},
        extra_body={"charter": {"lora": {"r": 4, "alpha": 8}}},
    )
    assert (job.object, job.status, job.model, job.training_file, job.seed) == (
        "fine_tuning.job",
        "queued",
        "tiny",
        prefs.id,
        7,
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.metadata == {"team": "a"} and job.fine_tuned_model is None
    spec = app_client.get(f"/v1/jobs/{job.id}").json()["spec"]
    assert spec["train"]["args"] == {"beta": 0.2, "num_train_epochs": 2, "learning_rate": pytest.approx(1e-5)}
    assert spec["train"]["lora"]["r"] == 4 and spec["dataset"] == {
        "source": prefs.id,
        "limit": None,
        "validation": None,
    }
    assert spec["name"] == "mine" and spec["data"]["seed"] == 7

    assert sdk.fine_tuning.jobs.retrieve(job.id).model_dump() == job.model_dump()
    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    events = sdk.fine_tuning.jobs.list_events(job.id).data
    assert events[0].object == "fine_tuning.job.event" and "cancelled" in events[0].message
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):
        sdk.fine_tuning.jobs.retrieve("job-000000000000")
    with pytest.raises(openai.BadRequestError) as e:
        sdk.fine_tuning.jobs.create(model="tiny", training_file=prefs.id, method={"type": "reinforcement"})
    assert e.value.body["param"] == "method.reinforcement.grader" and "needs a grader" in e.value.body["message"]


def test_reinforcement_errors_name_the_grader_field(sdk: openai.OpenAI) -> None:
    rft = sdk.files.create(file=("rft.jsonl", jsonl(RFT)), purpose="fine-tune")
    assert rft.model_extra == {"kind": "prompts", "rows": 4}
    sft = sdk.files.create(file=("sft.jsonl", jsonl(SFT)), purpose="fine-tune")
    sim = {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}

    def rl(grader: dict, **hyper: object) -> dict:
        return {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hyper}}

    cases = [
        (
            rl({**sim, "evaluation_metric": "meteor"}),
            "method.reinforcement.grader.evaluation_metric",
            "'meteor' is not supported",
        ),
        (
            rl({**sim, "evaluation_metric": "cosine"}),
            "method.reinforcement.grader.evaluation_metric",
            "embedding model",
        ),
        (
            rl({"type": "python", "source": "def grade(s, i): return 1.0"}),
            "method.reinforcement.grader",
            "'python' is not supported",
        ),
        (rl({"type": "label_model", "model": "x"}), "method.reinforcement.grader", "'label_model' is not supported"),
        (rl({**CHECK, "operation": "regex"}), "method.reinforcement.grader.operation", "'eq'"),
        (rl({**CHECK, "reference": "{{item.solution}}"}), "training_file", "no field 'solution'"),
        (
            rl({**CHECK, "reference": "{{foo.answer}}"}),
            "method.reinforcement.grader",
            "{{foo.answer}} is not supported",
        ),
        (
            rl({"type": "multi", "graders": {"a": CHECK}, "calculate_output": "a + b"}),
            "method.reinforcement.grader",
            "'b', which is not one of the graders",
        ),
        (
            rl(
                {
                    "type": "score_model",
                    "model": "no-such-judge",
                    "input": [{"role": "user", "content": "{{sample.output_text}}"}],
                }
            ),
            "method.reinforcement.grader.model",
            "no-such-judge",
        ),
        (
            rl(
                {
                    "type": "multi",
                    "graders": {"m": {"type": "multi", "graders": {}, "calculate_output": "1"}},
                    "calculate_output": "m",
                }
            ),
            "method.reinforcement.grader.graders.m",
            "'multi' is not supported inside a multi grader",
        ),
        (
            rl(CHECK, compute_multiplier=2),
            "method.reinforcement.hyperparameters.compute_multiplier",
            "no TRL counterpart",
        ),
        (rl(CHECK, reasoning_effort="high"), "method.reinforcement.hyperparameters.reasoning_effort", "reasoning"),
        (rl(CHECK, beta=0.1), "method.reinforcement.hyperparameters.beta", "dpo hyperparameter"),
        (
            {"type": "supervised", "supervised": {"grader": CHECK}},
            "method.supervised.grader",
            "reinforcement jobs only",
        ),
    ]
    for method, param, fragment in cases:
        with pytest.raises(openai.BadRequestError) as e:
            sdk.fine_tuning.jobs.create(model="tiny", training_file=rft.id, method=method)
        assert e.value.body["param"] == param, (method, e.value.body)
        assert fragment in e.value.body["message"], (method, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        sdk.fine_tuning.jobs.create(model="tiny", training_file=sft.id, method=rl(CHECK))
    assert e.value.body["param"] == "training_file" and "needs a prompts dataset" in e.value.body["message"]


def test_validation_files_are_checked_like_training_files(sdk: openai.OpenAI, app_client: TestClient) -> None:
    rft = sdk.files.create(file=("rft.jsonl", jsonl(RFT)), purpose="fine-tune")
    bare = sdk.files.create(file=("bare.jsonl", jsonl([{"prompt": "What is 1 + 1?"}])), purpose="fine-tune")
    prefs = sdk.files.create(file=("prefs.jsonl", jsonl(PREFS)), purpose="fine-tune")
    method = {"type": "reinforcement", "reinforcement": {"grader": CHECK}}
    with pytest.raises(openai.BadRequestError) as e:
        sdk.fine_tuning.jobs.create(model="tiny", training_file=rft.id, validation_file=bare.id, method=method)
    assert e.value.body["param"] == "validation_file" and "no field 'answer'" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        sdk.fine_tuning.jobs.create(model="tiny", training_file=rft.id, validation_file="file-nope", method=method)
    assert e.value.body["param"] == "validation_file" and "no file with id" in e.value.body["message"]
    spec = {"name": "r", "policy": {"model": "tiny"}, "train": {"method": "reward"}}
    r = app_client.post("/v1/jobs", json={**spec, "dataset": {"source": prefs.id, "validation": prefs.id}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["dataset", "validation"]
    assert "heldout_fraction" in r.text


def test_reinforcement_maps_to_grpo_with_a_grader_reward(sdk: openai.OpenAI, app_client: TestClient) -> None:
    rft = sdk.files.create(file=("rft.jsonl", jsonl(RFT)), purpose="fine-tune")
    hyper = {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2, "eval_interval": 3}
    job = sdk.fine_tuning.jobs.create(
        model="tiny",
        training_file=rft.id,
        validation_file=rft.id,
        method={"type": "reinforcement", "reinforcement": {"grader": CHECK, "hyperparameters": hyper}},
    )
    assert job.method.type == "reinforcement" and job.validation_file == rft.id
    assert job.method.reinforcement.grader.model_dump(exclude_none=True) == CHECK
    spec = app_client.get(f"/v1/jobs/{job.id}").json()["spec"]
    assert spec["train"]["method"] == "grpo" and spec["dataset"]["validation"] == rft.id
    assert spec["train"]["args"] == {
        "num_train_epochs": 1,
        "per_device_train_batch_size": 4,
        "learning_rate": pytest.approx(2e-6),
        "eval_steps": 3,
    }
    [reward] = spec["train"]["rewards"]
    assert reward["type"] == "grader" and reward["name"] == "exact_answer" and reward["grader"]["operation"] == "eq"
    sdk.fine_tuning.jobs.cancel(job.id)

    judged = sdk.fine_tuning.jobs.create(
        model="tiny",
        training_file=rft.id,
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": {
                    "type": "score_model",
                    "name": "judge",
                    "model": "tiny",
                    "range": [0, 10],
                    "input": [{"role": "user", "content": "Rate {{sample.output_text}} against {{item.answer}}."}],
                }
            },
        },
    )
    spec = app_client.get(f"/v1/jobs/{judged.id}").json()["spec"]
    assert spec["judge"]["model"] == "tiny"  # the score_model's model is the job's judge
    sdk.fine_tuning.jobs.cancel(judged.id)


def test_fine_tuning_list_pages_with_after(sdk: openai.OpenAI) -> None:
    sft = sdk.files.create(file=("sft.jsonl", jsonl(SFT)), purpose="fine-tune")
    made = [sdk.fine_tuning.jobs.create(model="tiny", training_file=sft.id).id for _ in range(3)]
    page = sdk.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == made[::-1][:2] and page.has_more
    rest = sdk.fine_tuning.jobs.list(limit=2, after=page.data[-1].id)
    assert rest.data[0].id == made[0]
    seen = [j.id for j in sdk.fine_tuning.jobs.list(limit=2)]  # iterating, the SDK follows `after`
    assert seen[:3] == made[::-1] and len(seen) == len(set(seen))


def test_file_store_on_sqlite_and_postgres(db_url: str, tmp_path: Path) -> None:
    from charter.service.files import FileNotFound, FileStore

    from .helpers import make_store

    store = make_store(db_url)  # runs the migrations, the files table's included
    files = FileStore(store.engine, tmp_path / "files")
    files.root.mkdir()
    made = []
    for i in range(3):
        src = tmp_path / f"src{i}"
        src.write_bytes(jsonl(SFT))
        made.append(files.add(src, tenant="alice", filename=f"{i}.jsonl", purpose="fine-tune", kind="sft", rows=4))
        assert not src.exists() and (files.root / made[-1].id).read_bytes() == jsonl(SFT)
    other = tmp_path / "other"
    other.write_bytes(b"{}")
    files.add(other, tenant="bob", filename="b.jsonl", purpose="fine-tune", kind="prompts", rows=1)

    newest_first = [f.id for f in files.list("alice", None, 10, None)]
    assert newest_first == [f.id for f in made[::-1]]
    assert [f.id for f in files.list("alice", None, 10, newest_first[0])] == newest_first[1:]
    assert len(files.list(None, None, 10, None)) == 4  # an admin sees both tenants
    assert files.get(made[0].id, "alice").sha256 == hashlib.sha256(jsonl(SFT)).hexdigest()
    with pytest.raises(FileNotFound):
        files.get(made[0].id, "bob")
    with pytest.raises(FileNotFound):
        files.delete(made[0].id, "bob")
    files.delete(made[0].id, "alice")
    assert not (files.root / made[0].id).exists()
    store.engine.dispose()
