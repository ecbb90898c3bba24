"""Webhooks on SQLite and PostgreSQL: a finished job's JSON POSTed, signed, to its ``callback_url``.

A real HTTP server on 127.0.0.1 (allowed by ``EMBEDSEG_WEBHOOK_ALLOWED_NETWORKS``) receives the
deliveries; jobs run on the real runner. Retries use tiny delays (settings). Every path that ends a
job delivers: the runner, the API cancelling a queued job, the reconciler failing a job whose
workers were lost, and the reconciler taking over a delivery nobody holds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import WebhookReceiver, tiff_bytes, upload
from pydantic import ValidationError
from sqlalchemy import update

from embedseg_service.records import jobs, keys
from embedseg_service.records.orm import Job, JobStatus, utcnow
from embedseg_service.records.settings import Settings
from embedseg_service.records.webhooks import retry_delay, verify_signature
from embedseg_service.worker.reconcile import Reconciler
from embedseg_service.worker.runner import recover_stale_jobs, run_job

API = "/api/v1"
SECRET = "webhook-test-secret-0123456789"
ALLOW_HINT = "webhooks go only to public addresses unless EMBEDSEG_WEBHOOK_ALLOWED_NETWORKS lists the network"
PUBLIC_KEYS = {"url", "event", "delivery_id", "state", "attempts", "last_status", "last_error", "delivered_at",
               "next_attempt_at"}  # fmt: skip


@pytest.fixture
def receivers() -> Iterator[Any]:
    """``make(*statuses_or_answers)``: a started :class:`helpers.WebhookReceiver`; all are stopped after the test."""
    made: list[WebhookReceiver] = []

    def make(*answers: int | tuple[int, dict[str, str]]) -> WebhookReceiver:
        receiver = WebhookReceiver([(a, {}) if isinstance(a, int) else a for a in answers])
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """The API tests' settings with a webhook secret, 127.0.0.1 allowed, 3 attempts and tiny delays."""
    return Settings(_env_file=None, data_dir=tmp_path, database_url=database_url, broker_url=None,
                    storage_dir=tmp_path / "storage", progress_throttle_s=0.05, heartbeat_s=0.2,
                    webhook_secret=SECRET, webhook_allowed_networks=["127.0.0.1/32"], webhook_attempts=3,
                    webhook_backoff_s=0.01, webhook_max_delay_s=0.05, webhook_timeout_s=5.0)  # fmt: skip


def _labels(boxes: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
    labels = np.zeros((48, 64), np.uint16)
    for i, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        labels[y0:y1, x0:x1] = i
    return labels


def _submit(client: Any, url: str | None, headers: dict[str, str] | None = None) -> Any:
    """POST an evaluate job (two ground-truth objects, one found) with ``callback_url`` ``url``."""
    gt = upload(client, tiff_bytes(_labels([(4, 14, 6, 20), (20, 40, 30, 50)])), kind="labels", headers=headers)
    pred = upload(client, tiff_bytes(_labels([(4, 14, 6, 20)])), kind="labels", headers=headers)
    spec: dict[str, Any] = {"pairs": [{"gt_id": gt.json()["id"], "pred_id": pred.json()["id"]}], "thresholds": [0.5]}
    if url is not None:
        spec["callback_url"] = url
    return client.post(f"{API}/jobs/evaluate", json=spec, headers=headers)


def _job(client: Any, url: str, headers: dict[str, str] | None = None) -> str:
    response = _submit(client, url, headers)
    assert response.status_code == 202, response.text
    assert response.json()["spec"]["callback_url"] == url and response.json()["callback"] is None
    return response.json()["id"]


def _settled(client: Any, job_id: str, headers: dict[str, str] | None = None, timeout: float = 60.0) -> dict:
    """The job's body once its delivery is no longer pending."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"{API}/jobs/{job_id}", headers=headers).json()
        if body["callback"] is not None and body["callback"]["state"] != "pending":
            return body
        assert time.monotonic() < deadline, f"the delivery of job {job_id} did not settle: {body['callback']}"
        time.sleep(0.02)


def _signature(header: str, body: bytes) -> tuple[int, str, str]:
    """(timestamp, v1 of the header, the HMAC this test computes of the body at that timestamp)."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    timestamp = int(fields["t"])
    expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return timestamp, fields["v1"], expected


# --------------------------------------------------------------------------- delivered


def test_a_finished_job_posts_its_json_signed_with_the_secret(client: Any, settings: Settings, receivers: Any) -> None:
    receiver = receivers(200)
    job_id = _job(client, receiver.url)
    assert run_job(job_id, settings=settings) == "succeeded"
    body = _settled(client, job_id)
    callback = body["callback"]
    assert set(callback) == PUBLIC_KEYS  # the lease stays internal
    assert callback["state"] == "delivered" and callback["attempts"] == 1 and callback["last_status"] == 200
    assert callback["last_error"] is None and callback["next_attempt_at"] is None
    assert callback["url"] == receiver.url and callback["event"] == "job.succeeded"
    assert callback["delivered_at"] >= body["finished_at"]

    ((path, headers, raw),) = receiver.received
    assert path == "/hook?lab=a"
    assert headers["Host"] == f"127.0.0.1:{receiver.server.server_address[1]}"
    assert headers["Content-Type"] == "application/json"
    assert headers["X-EmbedSeg-Event"] == "job.succeeded"
    assert headers["X-EmbedSeg-Delivery"] == callback["delivery_id"]
    assert headers["X-EmbedSeg-Attempt"] == "1"
    timestamp, v1, expected = _signature(headers["X-EmbedSeg-Signature"], raw)
    assert v1 == expected and abs(time.time() - timestamp) < 600
    assert verify_signature(SECRET, headers["X-EmbedSeg-Signature"], raw)
    assert not verify_signature("another-secret-0123456789", headers["X-EmbedSeg-Signature"], raw)
    assert not verify_signature(SECRET, headers["X-EmbedSeg-Signature"], raw + b" ")
    assert not verify_signature(SECRET, headers["X-EmbedSeg-Signature"], raw, now=timestamp + 301)
    # the job's JSON as GET /jobs/{id} answers it, without the delivery record that changes with each attempt
    delivered = json.loads(raw)
    assert delivered == {**body, "callback": None}
    assert delivered["status"] == "succeeded" and delivered["metrics"]["ap"]["ap"] == [0.5]


def test_a_receiver_that_fails_twice_gets_the_third_attempt(client: Any, settings: Settings, receivers: Any) -> None:
    receiver = receivers(500, 503, 200)
    job_id = _job(client, receiver.url)
    assert run_job(job_id, settings=settings) == "succeeded"
    callback = _settled(client, job_id)["callback"]
    assert (callback["state"], callback["attempts"], callback["last_status"]) == ("delivered", 3, 200)
    assert [headers["X-EmbedSeg-Attempt"] for _, headers, _ in receiver.received] == ["1", "2", "3"]
    assert {headers["X-EmbedSeg-Delivery"] for _, headers, _ in receiver.received} == {callback["delivery_id"]}
    assert len({raw for _, _, raw in receiver.received}) == 1  # the same body on every attempt


def test_a_receiver_that_always_fails_ends_failed_after_the_bound(
    client: Any, settings: Settings, receivers: Any
) -> None:
    receiver = receivers(500)
    job_id = _job(client, receiver.url)
    assert run_job(job_id, settings=settings) == "succeeded"
    body = _settled(client, job_id)
    callback = body["callback"]
    assert callback["state"] == "failed" and callback["attempts"] == settings.webhook_attempts == 3
    assert (callback["last_status"], callback["last_error"]) == (500, "answered 500")
    assert callback["delivered_at"] is None and callback["next_attempt_at"] is None
    assert len(receiver.received) == 3
    assert body["status"] == "succeeded"  # the job itself is not touched


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ((404, {}), "answered 404"),
        ((302, {"Location": "http://127.0.0.1:9/elsewhere"}), "answered 302; redirects are not followed"),
    ],
)
def test_other_answers_are_final_at_once(
    client: Any, settings: Settings, receivers: Any, answer: tuple[int, dict[str, str]], error: str
) -> None:
    receiver = receivers(answer, 200)
    job_id = _job(client, receiver.url)
    assert run_job(job_id, settings=settings) == "succeeded"
    callback = _settled(client, job_id)["callback"]
    assert (callback["state"], callback["attempts"], callback["last_status"]) == ("failed", 1, answer[0])
    assert callback["last_error"] == error
    assert len(receiver.received) == 1


def test_retry_after_is_honoured_within_the_bound(client: Any, settings: Settings, receivers: Any) -> None:
    receiver = receivers((429, {"Retry-After": "3600"}), 200)  # an hour, cut to webhook_max_delay_s
    job_id = _job(client, receiver.url)
    assert run_job(job_id, settings=settings) == "succeeded"
    callback = _settled(client, job_id)["callback"]
    assert (callback["state"], callback["attempts"]) == ("delivered", 2)
    assert retry_delay(1, settings, "3600") == settings.webhook_max_delay_s == 0.05
    assert retry_delay(1, settings, "0") == 0.0
    assert retry_delay(1, settings, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert retry_delay(1, settings, "soon") == settings.webhook_backoff_s  # unreadable: the back-off applies
    assert [retry_delay(n, settings) for n in (1, 2, 3, 4)] == [0.01, 0.02, 0.04, 0.05]


# --------------------------------------------------------------------------- every path that ends a job


def test_cancelling_a_queued_job_delivers_job_cancelled(client: Any, receivers: Any) -> None:
    receiver = receivers(200)
    job_id = _job(client, receiver.url)
    assert client.post(f"{API}/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    body = _settled(client, job_id)
    assert (body["callback"]["state"], body["callback"]["event"]) == ("delivered", "job.cancelled")
    ((_, headers, raw),) = receiver.received
    assert headers["X-EmbedSeg-Event"] == "job.cancelled"
    assert json.loads(raw) == {**body, "callback": None}


def test_a_job_failed_after_its_workers_were_lost_delivers_job_failed(
    client: Any, session: Any, settings: Settings, receivers: Any
) -> None:
    receiver = receivers(200)
    job_id = _job(client, receiver.url)
    for attempt in (1, 2, 3):
        assert jobs.claim_job(session, job_id, f"dead:{attempt}")
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=60)))
        session.commit()
        recover_stale_jobs(settings)
    body = _settled(client, job_id)
    assert body["status"] == "failed" and body["error"].startswith("the worker running this job was lost 3 times")
    assert (body["callback"]["state"], body["callback"]["event"]) == ("delivered", "job.failed")
    assert json.loads(receiver.received[0][2])["error"] == body["error"]


def test_the_reconciler_takes_over_a_delivery_nobody_holds(
    client: Any, session: Any, settings: Settings, receivers: Any
) -> None:
    receiver = receivers(200)
    job_id, held = _job(client, receiver.url), _job(client, receiver.url)
    # ended by a process that stopped before delivering: the record is pending, no lease
    for job in (job_id, held):
        assert jobs.finish_job(session, job, JobStatus.failed, error="stopped")
    pending = client.get(f"{API}/jobs/{job_id}").json()["callback"]
    assert (pending["state"], pending["attempts"], pending["event"]) == ("pending", 0, "job.failed")
    # another process holds the second one's lease, which still runs
    record = {
        **jobs.get_job(session, held).callback,
        "lease": "other",
        "lease_until": (utcnow() + timedelta(hours=1)).isoformat(),
    }
    session.execute(update(Job).where(Job.id == held).values(callback=record))
    session.commit()

    assert Reconciler(settings, None).run_once().callbacks == [job_id]
    assert _settled(client, job_id)["callback"]["state"] == "delivered"
    assert [h["X-EmbedSeg-Delivery"] for _, h, _ in receiver.received] == [pending["delivery_id"]]
    assert client.get(f"{API}/jobs/{held}").json()["callback"]["state"] == "pending"


def test_the_delivery_checks_the_address_again(client: Any, settings: Settings, receivers: Any) -> None:
    receiver = receivers(200)
    job_id = _job(client, receiver.url)
    # the rules changed (or the name now resolves elsewhere) between submission and delivery
    assert run_job(job_id, settings=settings.model_copy(update={"webhook_allowed_networks": []})) == "succeeded"
    callback = _settled(client, job_id)["callback"]
    assert (callback["state"], callback["attempts"], callback["last_status"]) == ("failed", 1, None)
    assert callback["last_error"] == f"refused at delivery: 127.0.0.1 is a loopback address; {ALLOW_HINT}"
    assert receiver.received == []


# --------------------------------------------------------------------------- refused at submission


@pytest.mark.parametrize(
    ("url", "detail"),
    [
        ("ftp://example.org/hook", "must be an http:// or https:// URL, got ftp://"),
        ("example.org/hook", "must be an http:// or https:// URL, got no scheme"),
        (
            "https://lab:secret@example.org/hook",
            "must not contain a user name or password; receivers authenticate deliveries by their "
            "X-EmbedSeg-Signature header",
        ),
        ("https://example.org/" + "a" * 2100, "must be at most 2048 characters, got 2120"),
        ("https://example.org/a b", "must not contain spaces or control characters"),
        ("https:///hook", "must name a host, e.g. https://pipeline.example.org/embedseg"),
        ("https://example.org:0/hook", "has an invalid port; give a number from 1 to 65535"),
        ("http://10.1.2.3/hook", f"10.1.2.3 is a private address; {ALLOW_HINT}"),
        ("http://169.254.169.254/latest/meta-data", f"169.254.169.254 is a link-local address; {ALLOW_HINT}"),
        ("http://[::1]:8080/hook", f"::1 is a loopback address; {ALLOW_HINT}"),
        ("http://[::ffff:10.0.0.1]/hook", f"::ffff:10.0.0.1 is a private address; {ALLOW_HINT}"),
        ("http://0.0.0.0:8080/hook", "0.0.0.0 is the unspecified address; webhooks never go to it"),
    ],
)
def test_refused_callback_urls_answer_422(client: Any, url: str, detail: str) -> None:
    response = _submit(client, url)
    assert response.status_code == 422
    assert response.json() == {"detail": f"callback_url: {detail}"}
    assert client.get(f"{API}/jobs").json()["total"] == 0


def test_loopback_is_refused_unless_allowed_and_nothing_without_a_secret(
    client: Any, app: Any, settings: Settings
) -> None:
    app.state.settings = settings.model_copy(update={"webhook_allowed_networks": []})
    response = _submit(client, "http://127.0.0.1:9/hook")
    assert response.status_code == 422
    assert response.json() == {"detail": f"callback_url: 127.0.0.1 is a loopback address; {ALLOW_HINT}"}
    app.state.settings = settings.model_copy(update={"webhook_secret": None})
    response = _submit(client, "https://example.org/hook")
    assert response.status_code == 422
    assert response.json() == {
        "detail": "callback_url: this server has no webhook secret to sign deliveries with (EMBEDSEG_WEBHOOK_SECRET "
        "is unset); ask its operator to set one, or leave callback_url out"
    }
    assert _submit(client, None).status_code == 202  # a job without a callback needs no secret
    assert client.get(f"{API}/jobs").json()["total"] == 1


def test_webhook_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="webhook_secret must be at least 16 characters"):
        Settings(_env_file=None, webhook_secret="short")
    with pytest.raises(ValidationError, match="'intranet' is not a network; write a CIDR such as 10.0.0.0/8"):
        Settings(_env_file=None, webhook_allowed_networks=["intranet"])
    settings = Settings(_env_file=None, webhook_secret="", webhook_allowed_networks=["10.1.2.3/8"])
    assert settings.webhook_secret is None and settings.webhook_allowed_networks == ["10.0.0.0/8"]
    assert SECRET not in repr(Settings(_env_file=None, webhook_secret=SECRET))


# --------------------------------------------------------------------------- owners


def test_another_owner_cannot_see_the_callback_record(client: Any, session: Any, receivers: Any) -> None:
    a = {"Authorization": f"Bearer {keys.create_key(session, 'lab-a').secret}"}
    b = {"Authorization": f"Bearer {keys.create_key(session, 'lab-b').secret}"}
    receiver = receivers(200)
    job_id = _job(client, receiver.url, a)
    assert client.post(f"{API}/jobs/{job_id}/cancel", headers=b).status_code == 404
    assert client.post(f"{API}/jobs/{job_id}/cancel", headers=a).status_code == 200
    assert _settled(client, job_id, a)["callback"]["state"] == "delivered"
    response = client.get(f"{API}/jobs/{job_id}", headers=b)
    assert response.status_code == 404 and response.json() == {"detail": f"Job {job_id} not found"}
    assert client.get(f"{API}/jobs", headers=b).json() == {"items": [], "total": 0, "limit": 50, "offset": 0}
    listed = client.get(f"{API}/jobs", headers=a).json()["items"]
    assert [(job["id"], job["callback"]["state"]) for job in listed] == [(job_id, "delivered")]
