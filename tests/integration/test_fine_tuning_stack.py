"""The fine-tuning API of a real `genq api` process (Postgres, Redis, S3) through the `openai`
package: training data goes to S3 and is read back to be checked, and a created job reaches its
training queue on Redis as the task the training workers take. No worker runs here."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from genq.shared.broker import FINE_TUNE_TASK, make_celery, train_queue_name
from tests.support.processes import Stack
from tests.support.queues import take_all

pytestmark = pytest.mark.integration

CHAT = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {i}"},
                      {"role": "assistant", "content": str(i)}]} for i in range(4)]


@pytest.fixture(scope="module")
def api(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API process of our own (no workers: a fine-tuning task stays on its queue to be read)."""
    stack = Stack(stack_env, Path(tmp_path_factory.mktemp("fine-tuning-api")))
    try:
        stack.start_api()
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


def _taken(settings: Any, model: str) -> list[tuple[str, list[Any]]]:
    """Take every task off a model's training queue: (task name, args)."""
    return take_all(make_celery(settings), train_queue_name(model), timeout=1)


def test_a_created_job_reaches_its_training_queue(api: Stack, settings_for: Any) -> None:
    client = openai.OpenAI(base_url=f"{api.base_url}/v1", api_key="sk-local", max_retries=0, timeout=60)
    settings = settings_for()
    _taken(settings, "ft-queue-chat")  # nothing left over from an earlier run
    data = "".join(json.dumps(x) + "\n" for x in CHAT).encode()
    training = client.files.create(file=("chat.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert client.files.content(training.id).content == data
    job = client.fine_tuning.jobs.create(model="ft-queue-chat", training_file=training.id, suffix="helper",
                                         extra_body={"lora": {"r": 2}})
    assert job.status == "queued" and job.hyperparameters.n_epochs == 10  # auto, for 4 examples
    assert _taken(settings, "ft-queue-chat") == [(FINE_TUNE_TASK, [job.id])]
    created = client.fine_tuning.jobs.list_events(job.id).data[0]
    assert created.data["lora"]["r"] == 2 and created.data["training_examples"] == 4

    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("bad.jsonl", io.BytesIO(data + b'{"messages": [{"role": "user"}]}\n')),
                            purpose="fine-tune")
    assert info.value.body["line"] == 5 and info.value.body["errors"][0]["param"] == "messages[0].content"
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
