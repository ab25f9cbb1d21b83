"""common/: the one sha256 helper and the one device resolver (issue 22)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from safe_diffusion.common.devices import check_device, default_device, use_cpu
from safe_diffusion.common.errors import InputError
from safe_diffusion.common.hashing import sha256_bytes, sha256_file, sha256_json, sha256_text


def test_one_sha256_for_files_bytes_texts_and_json(tmp_path):
    data = bytes(range(256)) * 5000  # larger than one block when read in small blocks
    path = tmp_path / "blob"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == sha256_file(path, block=1000) == sha256_bytes(data) == expected
    assert sha256_text("é") == hashlib.sha256("é".encode()).hexdigest()
    assert sha256_json({"b": 1, "a": [1, 2]}) == sha256_json({"a": [1, 2], "b": 1})


def test_one_device_resolver(monkeypatch):
    assert check_device("--device", None) == default_device()
    assert check_device("--device", torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(InputError, match=r"^--device 'banana' is not a device"):
        check_device("--device", "banana")
    assert use_cpu("cpu")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # what `accelerate launch --cpu` sets
    assert use_cpu(None)


def test_progress_rates_read_as_numbers():
    """A count done at once (read from a cache) is no rate: `eval quality` printed "3.15e+05 images/s"."""
    import io

    from safe_diffusion.common.progress import ProgressLog, format_rate

    assert format_rate(10, 4.0, "images") == "2.50 images/s"
    assert format_rate(315_000, 1.0, "images") == "315,000 images/s"
    assert format_rate(5, 0.01, "images") == "? images/s"
    stream = io.StringIO()
    with ProgressLog("quality", 4, stream=stream, interval=0) as log:
        log.set(4)
    assert "e+" not in stream.getvalue() and "? images/s" in stream.getvalue()


# -- read-ahead ----------------------------------------------------------------------------------------


def test_read_ahead_yields_in_order_within_its_window_and_reraises_at_the_item(monkeypatch):
    import threading

    from safe_diffusion.common import prefetch

    monkeypatch.setattr(prefetch.os, "cpu_count", lambda: 4)  # threads even on a one-core runner
    started, lock = [], threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        if i == 17:
            raise ValueError("item 17")
        return i * i

    out = []
    with pytest.raises(ValueError, match="item 17"):
        for k, value in enumerate(prefetch.read_ahead(work, list(range(30)), window=5)):
            with lock:
                assert max(started) < k + 5 + 1, "never more than `window` items ahead of the consumer"
            out.append(value)
    assert out == [i * i for i in range(17)]
    assert list(prefetch.read_ahead(work, [3], window=5)) == [9]  # one item: in line
