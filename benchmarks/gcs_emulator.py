"""A local GCS emulator that counts requests, for the scale rehearsal (benchmarks/scale.py) and tests/test_scale.py.

`CountingEmulator` starts `gcp-storage-emulator` (setup.py's `bench` extra) in this process, on 127.0.0.1 and a
free port, with an in-memory bucket, and points Beam's real GCS filesystem at it (`STORAGE_EMULATOR_HOST`: the
Google storage client then talks to that address, anonymously). Every HTTP request the emulator serves is recorded
with its kind ("objects.get", "media.get", "objects.list", "batch", ...); each item of a batch request is recorded
too, as "batch:<METHOD>" (a batch of 100 deletes is 1 HTTP request and 100 operations). Listings are served in
pages of at most 1,000 names, as GCS serves them (the emulator alone answers a listing in one response), and
`put` fills the bucket without requests, for growth measurements over many objects.

Requests are attributed to the phase of the run in which they were made: `phase` is "launch" until Beam's local
runner (FnApiRunner) starts, then the name of the fused stage whose bundle is executing (the runner executes one
bundle at a time with `--direct_num_workers 1`), then "after" once the pipeline has finished. That attribution
wraps a private method of Beam's runner (`FnApiRunner._execute_bundle`, Beam 2.77), as benchmarks/stage_times.py
does: a measuring aid, not part of the product.

Beam looks for Google credentials before it creates a storage client, and retries for about 30 s when there are
none (`apache_beam.internal.gcp.auth`, with exponential backoff). The emulator needs none, so `CountingEmulator`
records "no credentials" in that lookup's cache for this process: Beam then creates an anonymous client at once.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

LAUNCH, AFTER = "launch", "after"


@dataclass(frozen=True)
class Request:
    t: float  # time.perf_counter() when the emulator received it
    phase: str  # "launch", a fused stage's name, or "after"
    kind: str  # "objects.get", "media.get", "batch:DELETE", ...
    target: str  # "bucket/object" (or the bucket), for batch items the item's object
    batch_item: bool  # one operation of a batch request (the batch itself is a separate Request)


def classify(method: str, path: str, query: str) -> tuple[str, str]:
    """(kind, bucket/object) of one request of the GCS JSON API, as the emulator routes it."""
    q = parse_qs(query)
    m = re.fullmatch(r"/batch/storage/v1", path)
    if m:
        return "batch", ""
    m = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path)
    if m:
        name = q.get("name", [""])[0]
        kind = "upload.resumable_chunk" if method == "PUT" else (
            "upload.resumable_start" if q.get("uploadType") == ["resumable"] else "upload." + q.get(
                "uploadType", ["?"])[0])
        return kind, f"{m.group(1)}/{name}"
    m = re.fullmatch(r"/download/storage/v1/b/([^/]+)/o/(.+)", path)
    if m:
        return "media.get", f"{m.group(1)}/{unquote(m.group(2))}"
    m = re.fullmatch(r"(?:/storage/v1)?/b/([^/]+)/o/(.+)/(copyTo|rewriteTo)/b/([^/]+)/o/(.+)", path)
    if m:
        return f"objects.{m.group(3)[:-2]}", f"{m.group(4)}/{unquote(m.group(5))}"
    m = re.fullmatch(r"(?:/storage/v1)?/b/([^/]+)/o/(.+)", path)
    if m:
        target = f"{m.group(1)}/{unquote(m.group(2))}"
        if method == "GET":
            return ("media.get" if q.get("alt") == ["media"] else "objects.get"), target
        return {"DELETE": "objects.delete", "PATCH": "objects.patch"}.get(method, f"objects.{method}"), target
    m = re.fullmatch(r"(?:/storage/v1)?/b/([^/]+)/o", path)
    if m:
        return ("objects.list" if method == "GET" else f"objects.{method}"), f"{m.group(1)}/{q.get('prefix', [''])[0]}"
    m = re.fullmatch(r"(?:/storage/v1)?/b/([^/]+)", path)
    if m:
        return f"buckets.{method.lower()}", m.group(1)
    return f"other.{method}", path


PAGE = 1000  # GCS's largest listing page


def _paged(ls):
    """The emulator's listing handler serving `maxResults` (at most PAGE) names a page, objects and prefixes
    together in name order, with a `nextPageToken`, as GCS does; the emulator alone answers everything at once."""
    import json

    def paged(request, response, storage, *args, **kwargs):
        ls(request, response, storage, *args, **kwargs)
        if response.status != 200 or not getattr(response, "_content", None):
            return
        listing = json.loads(response._content)
        names = sorted([(item["name"], item) for item in listing.get("items", [])]
                       + [(prefix, None) for prefix in listing.get("prefixes", [])], key=lambda n: n[0])
        size = min(PAGE, int(request.query.get("maxResults", [PAGE])[0]))
        start = int(request.query.get("pageToken", ["0"])[0])
        page = names[start:start + size]
        out = {"kind": "storage#objects", "items": [i for _, i in page if i is not None],
               "prefixes": [n for n, i in page if i is None]}
        if start + size < len(names):
            out["nextPageToken"] = str(start + size)
        response.json(out)

    paged.__name__ = "ls_paged"
    return paged


class CountingEmulator:
    """`with CountingEmulator("bucket") as emu:` a GCS emulator on 127.0.0.1 holding `bucket`, with Beam's GCS
    filesystem pointed at it; `emu.requests` is every request served, `emu.counts()` their kinds."""

    def __init__(self, bucket: str = "bucket"):
        self.bucket = bucket
        self.requests: list[Request] = []
        self.phase = LAUNCH
        self._lock = threading.Lock()
        self._undo: list = []

    # ------------------------------------------------------------------ start, stop
    def __enter__(self) -> "CountingEmulator":
        from gcp_storage_emulator import server as emulator

        self._server = emulator.create_server("127.0.0.1", 0, in_memory=True, default_bucket=self.bucket)
        self._patch(emulator.Router, "handle", self._counting_handle(emulator.Router.handle))
        self._patch(emulator, "_parse_batch_item", self._counting_batch_item(emulator._parse_batch_item))
        for _, handlers in emulator.HANDLERS:  # listings in pages, as GCS serves them
            for method, handler in list(handlers.items()):
                if handler.__name__ == "ls":
                    self._patch_item(handlers, method, _paged(handler))
        log = logging.getLogger("gcp_storage_emulator")
        level = log.level
        log.setLevel(logging.ERROR)  # it warns on every response it sends from a string
        self._undo.append(lambda: log.setLevel(level))
        self._server.start()
        host, port = self._server._api._httpd.server_address[:2]
        assert host == "127.0.0.1", host
        self.endpoint = f"http://127.0.0.1:{port}"
        self._set_env("STORAGE_EMULATOR_HOST", self.endpoint)
        self._set_env("GOOGLE_CLOUD_PROJECT", "emulated")
        self._anonymous_beam()
        self._attribute_phases()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def _patch(self, owner, name: str, value) -> None:
        old = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, value)
        self._undo.append(lambda: setattr(owner, name, old))

    def _patch_item(self, mapping: dict, key, value) -> None:
        old = mapping[key]
        mapping[key] = value
        self._undo.append(lambda: mapping.__setitem__(key, old))

    def put(self, names, size: int = 1) -> None:
        """Objects of `size` bytes at `names` in the bucket, written into the emulator's store directly (no
        request, none counted): for growth measurements over many objects."""
        storage, now = self._server._storage, "2026-01-01T00:00:00.000000Z"
        objects = storage.objects.setdefault(self.bucket, {})
        for name in names:
            storage._store.write_bytes(storage._object_path(self.bucket, name), b"x" * size)
            objects[name] = {"kind": "storage#object", "name": name, "bucket": self.bucket, "size": str(size),
                             "generation": "1", "metageneration": "1", "contentType": "application/octet-stream",
                             "timeCreated": now, "updated": now, "storageClass": "STANDARD",
                             "id": f"{self.bucket}/{name}/1"}

    def _set_env(self, name: str, value: str) -> None:
        old = os.environ.get(name)
        os.environ[name] = value
        self._undo.append(lambda: os.environ.__setitem__(name, old) if old is not None else os.environ.pop(name, None))

    def _anonymous_beam(self) -> None:
        """Beam's credential lookup answers "none" at once (an anonymous client; the emulator checks nothing)."""
        from apache_beam.internal.gcp import auth

        creds = auth._Credentials
        old = (creds._credentials_init, creds._credentials)
        creds._credentials_init, creds._credentials = True, None

        def undo():
            creds._credentials_init, creds._credentials = old

        self._undo.append(undo)

    def _attribute_phases(self) -> None:
        from apache_beam.runners.portability.fn_api_runner import fn_runner

        execute, run_pipeline = fn_runner.FnApiRunner._execute_bundle, fn_runner.FnApiRunner.run_pipeline
        emu = self

        def execute_bundle(runner, context, bundle_context_manager, *args, **kwargs):
            emu.phase = bundle_context_manager.stage.name
            return execute(runner, context, bundle_context_manager, *args, **kwargs)

        def whole_pipeline(runner, *args, **kwargs):
            try:
                return run_pipeline(runner, *args, **kwargs)
            finally:
                emu.phase = AFTER

        self._patch(fn_runner.FnApiRunner, "_execute_bundle", execute_bundle)
        self._patch(fn_runner.FnApiRunner, "run_pipeline", whole_pipeline)

    # ------------------------------------------------------------------ counting
    def _record(self, kind: str, target: str, batch_item: bool) -> None:
        with self._lock:
            self.requests.append(Request(time.perf_counter(), self.phase, kind, target, batch_item))

    def _counting_handle(self, handle):
        emu = self

        def counting_handle(router, method):
            override = router._request_handler.headers.get("x-http-method-override")
            url = urlsplit(router._request_handler.path)
            emu._record(*classify(override or method, url.path, url.query), batch_item=False)
            return handle(router, method)

        return counting_handle

    def _counting_batch_item(self, parse):
        emu = self

        def counting_parse(item):
            parsed = parse(item)
            target = f"{parsed.get('dest_bucket_name') or parsed.get('bucket_name', '')}/" \
                     f"{parsed.get('dest_object_id') or parsed.get('object_id', '')}"
            copy = "copyTo" if parsed.get("dest_object_id") else ""
            emu._record(f"batch:{parsed.get('method', '?')}{'.' + copy if copy else ''}", target, batch_item=True)
            return parsed

        return counting_parse

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
        self.phase = LAUNCH

    def counts(self, requests: list[Request] | None = None, items: bool = False) -> dict[str, int]:
        """Requests per kind (HTTP requests; with `items`, batch items instead of the batch requests holding
        them: operations)."""
        chosen = self.requests if requests is None else requests
        if items:
            chosen = [r for r in chosen if r.batch_item or r.kind != "batch"]
        else:
            chosen = [r for r in chosen if not r.batch_item]
        return dict(collections.Counter(r.kind for r in chosen))
