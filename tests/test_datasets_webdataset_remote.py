"""WebDataset shards read where they live: over HTTP from a loopback server started here, through
fsspec (``memory://`` and ``file://`` stand in for ``s3://``), and from ``pipe:`` commands; streamed
like local shards, split over ranks and workers, resumable, and never silently short."""

import http.server
import io
import json
import re
import tarfile
import threading
import uuid

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dinov2.data.datasets.base import DatasetFormatError
from dinov2.data.datasets.shard_sources import ShardReadError
from dinov2.data.loaders import make_data_loader, make_dataset
from dinov2.data.spec import DatasetSpecError, parse_dataset_spec

# Uneven shards; sample n is a PNG whose pixels hold n, so a batch tells exactly which samples it holds.
SHARD_SIZES = (5, 7, 4, 6)
PATTERN = "r-{000000..000003}.tar"


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_shards")
    n = 0
    for s, size in enumerate(SHARD_SIZES):
        with wds.TarWriter(str(root / f"r-{s:06d}.tar")) as sink:
            for _ in range(size):
                buffer = io.BytesIO()
                Image.new("L", (4, 4), n).save(buffer, format="PNG")
                sink.write({"__key__": f"s{n:03d}", "png": buffer.getvalue(), "cls": n % 3})
                n += 1
    return root


class _ShardHandler(http.server.BaseHTTPRequestHandler):
    """Serves the files of ``server.root``; honours ``Range: bytes=N-`` unless ``server.ranges`` is
    off; ``server.cuts[name] = [byte, times]`` ends the next ``times`` transfers of that file after
    ``byte`` bytes (the connection closes, as a dropped one does); ``server.no_length`` leaves out
    Content-Length (a body that ends where the connection closes)."""

    def do_GET(self):
        server = self.server
        name = self.path.lstrip("/")
        server.log.append((name, self.headers.get("Range")))
        path = server.root / name
        if "/" in name or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        if name in server.truncate:
            data = data[: server.truncate[name]]
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.ranges:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        if not server.no_length:
            self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = server.cuts.get(name)
        if cut and cut[1] > 0:
            cut[1] -= 1
            self.wfile.write(data[start : max(cut[0], start)])
            return  # HTTP/1.0: the server closes the connection here, before the announced length
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(shard_dir):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ShardHandler)
    httpd.root, httpd.log, httpd.cuts, httpd.truncate = shard_dir, [], {}, {}
    httpd.ranges, httpd.no_length = True, False
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _numbers(samples):
    return [int(np.asarray(image)[0, 0, 0]) for image, _ in samples]


def _loader(spec, rank=0, num_workers=0, batch_size=2, **kwargs):
    dataset = make_dataset(spec)
    dataset.rank, dataset.world_size = rank, 2  # as if built on rank `rank` of 2
    return make_data_loader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_numbers,
        rank=rank,
        world_size=2,
        persistent_workers=num_workers > 0,
        **kwargs,
    )


def _take(loader, count):
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def _all_numbers(spec):
    return _numbers(make_dataset(spec))


def _rank_numbers(spec, rank):
    """The samples rank ``rank`` of 2 streams with 2 loader workers, in order."""
    return [n for batch in _loader(spec, rank, num_workers=2, drop_last=False) for n in batch]


def test_spec_values_keep_the_colons_of_urls_and_commands():
    spec = "WebDataset:urls=https://host:8080/a-{0..1}.tar::pipe:curl -s https://h/b.tar?x=1:shuffle=3:"
    kind, options = parse_dataset_spec(spec)
    assert kind == "WebDataset"
    assert options == {"urls": "https://host:8080/a-{0..1}.tar::pipe:curl -s https://h/b.tar?x=1", "shuffle": "3"}
    assert parse_dataset_spec("ImageFolder:root=/data/a:b:cache=false")[1] == {"root": "/data/a:b", "cache": "false"}
    with pytest.raises(DatasetSpecError, match="expected key=value"):
        parse_dataset_spec("ImageFolder:root")
    with pytest.raises(DatasetSpecError, match="exactly one of urls"):
        make_dataset("WebDataset:length=3")


def test_http_stream_equals_local_split_over_two_ranks_and_two_workers(shard_dir, server):
    seen = []
    for rank in range(2):
        local = _rank_numbers(f"WebDataset:urls={shard_dir}/{PATTERN}", rank)
        remote = _rank_numbers(f"WebDataset:urls={server.url}/{PATTERN}", rank)
        assert remote == local and local
        seen.extend(remote)
    assert sorted(seen) == list(range(sum(SHARD_SIZES)))  # every sample once over the 4 readers
    assert sorted(name for name, _ in server.log) == [f"r-{s:06d}.tar" for s in range(4)]  # one GET per shard


def test_resume_mid_epoch_over_http_continues_with_the_same_batches(shard_dir, server):
    # A wids-style index: its sample counts let the resumed readers skip whole shards unread.
    index = {"shardlist": [{"url": f"r-{s:06d}.tar", "nsamples": size} for s, size in enumerate(SHARD_SIZES)]}
    (shard_dir / "index.json").write_text(json.dumps(index))
    options = ":shuffle=3:repeat=true:seed=1"
    straight = _take(_loader(f"WebDataset:urls={shard_dir}/{PATTERN}{options}", 0, 2), 12)
    for source in (f"urls={server.url}/{PATTERN}", f"shard_list={server.url}/index.json"):
        interrupted = _loader(f"WebDataset:{source}{options}", 0, 2)
        assert _take(interrupted, 5) == straight[:5]
        resumed = _loader(f"WebDataset:{source}{options}", 0, 2)
        resumed.load_state_dict(interrupted.state_dict())
        del server.log[:]
        assert _take(resumed, 7) == straight[5:], source
        reads = len(server.log)
        if source.startswith("urls"):
            counted = reads  # without counts each resumed reader reads its shard once to count it
        else:
            assert reads < counted
    assert len(make_dataset(f"WebDataset:shard_list={shard_dir}/index.json")) == sum(SHARD_SIZES)


@pytest.mark.parametrize("ranges", [True, False], ids=["range-request", "server-ignores-range"])
def test_a_dropped_connection_is_retried_where_it_broke(shard_dir, server, ranges, caplog):
    server.ranges = ranges
    server.cuts["r-000001.tar"] = [3000, 1]  # mid-shard, inside a member
    with caplog.at_level("WARNING", logger="dinov2"):
        remote = _all_numbers(f"WebDataset:urls={server.url}/{PATTERN}:retry_wait=0")
    assert remote == _all_numbers(f"WebDataset:urls={shard_dir}/{PATTERN}") == list(range(sum(SHARD_SIZES)))
    assert [entry for entry in server.log if entry[0] == "r-000001.tar"] == [
        ("r-000001.tar", None),
        ("r-000001.tar", "bytes=3000-"),
    ]
    assert f"{server.url}/r-000001.tar" in caplog.text and "at byte 3000" in caplog.text
    assert "retry 1 of 3" in caplog.text


def test_a_retry_after_the_last_byte_finds_the_shard_complete(server):
    from dinov2.data.datasets.shard_sources import _open_http

    size = (server.root / "r-000000.tar").stat().st_size
    raw, total, skip = _open_http(f"{server.url}/r-000000.tar", size, timeout=5)  # the server answers 416
    assert (raw.read(), total, skip) == (b"", size, 0)


def test_a_connection_that_keeps_dropping_is_a_clear_error(server):
    server.cuts["r-000002.tar"] = [3000, 10]
    size = (server.root / "r-000002.tar").stat().st_size
    with pytest.raises(ShardReadError) as info:
        _all_numbers(f"WebDataset:urls={server.url}/{PATTERN}:retries=2:retry_wait=0")
    message = str(info.value)
    assert f"{server.url}/r-000002.tar" in message
    assert f"at byte 3000 of {size} after 2 retries" in message and "last complete member was 's01" in message
    assert sum(name == "r-000002.tar" for name, _ in server.log) == 3  # the first attempt and two retries


def _member_boundary(path, member_index):
    with tarfile.open(path) as tar:
        return tar.getmembers()[member_index].offset  # where that member's header starts


@pytest.mark.parametrize("where", ["local", "http"])
def test_a_shard_cut_at_a_member_boundary_is_an_error_not_the_end(shard_dir, server, tmp_path, where):
    # Cut before the third sample's header: tarfile alone would end the shard there without a word.
    boundary = _member_boundary(shard_dir / "r-000000.tar", 4)
    if where == "local":
        cut = tmp_path / "cut-000000.tar"
        cut.write_bytes((shard_dir / "r-000000.tar").read_bytes()[:boundary])
        spec = f"WebDataset:urls={cut}"
    else:
        server.truncate["r-000000.tar"], server.no_length = boundary, True  # nothing announces the size
        spec = f"WebDataset:urls={server.url}/r-000000.tar"
    with pytest.raises(DatasetFormatError, match=f"ends after {boundary} bytes without the tar end-of-archive block"):
        _all_numbers(spec)


def test_pipe_commands_and_no_shell_for_urls_or_shard_lists(shard_dir, server, tmp_path, caplog):
    expected = list(range(sum(SHARD_SIZES)))
    assert _all_numbers(f"WebDataset:urls=pipe:cat {shard_dir}/{PATTERN}") == expected
    # A command that fails halfway the first time: run again, the bytes already read are skipped.
    flaky = f"if [ -e {tmp_path}/failed ]; then cat $0; else touch {tmp_path}/failed; head -c 3000 $0; exit 3; fi"
    shard = shard_dir / "r-000000.tar"
    with caplog.at_level("WARNING", logger="dinov2"):
        assert _all_numbers(f"WebDataset:urls=pipe:sh -c '{flaky}' {shard}:retry_wait=0") == expected[:5]
    # The reader notices the exit status at whatever byte it has consumed by then (3000 on a quiet
    # machine, earlier when the command exits before the reader drains the pipe): that byte, not
    # 3000, is where the retry resumes, and the samples above are the same either way.
    reached = re.search(r"exit 3 .* at byte (\d+); retry 1 of 3", caplog.text)
    assert reached and 0 < int(reached.group(1)) <= 3000
    with pytest.raises(ShardReadError, match=r"cat .*missing-000000.tar.*exit 1"):
        _all_numbers(f"WebDataset:urls=pipe:cat {tmp_path}/missing-000000.tar:retries=1:retry_wait=0")
    # Shell syntax in a URL is a file name to the server, never a command.
    with pytest.raises(DatasetFormatError, match="not found"):
        _all_numbers(f"WebDataset:urls={server.url}/r-000000.tar;touch$IFS{tmp_path}/ran")
    (tmp_path / "list.txt").write_text(f"r-000000.tar\npipe:touch {tmp_path}/ran\n")
    with pytest.raises(DatasetFormatError, match="line 2: names the command"):
        make_dataset(f"WebDataset:shard_list={tmp_path}/list.txt")
    assert not (tmp_path / "ran").exists()


def test_fsspec_memory_and_file_urls(shard_dir):
    fsspec = pytest.importorskip("fsspec")
    expected = list(range(sum(SHARD_SIZES)))
    store = f"/{uuid.uuid4().hex}"
    memory = fsspec.filesystem("memory")
    for s in range(len(SHARD_SIZES)):
        memory.pipe(f"{store}/r-{s:06d}.tar", (shard_dir / f"r-{s:06d}.tar").read_bytes())
    assert _all_numbers(f"WebDataset:urls=memory://{store}/{PATTERN}") == expected
    seen = [n for rank in range(2) for n in _rank_numbers(f"WebDataset:urls=file://{shard_dir}/{PATTERN}", rank)]
    assert sorted(seen) == expected
    memory.rm(store, recursive=True)


def test_shard_list_files(shard_dir, server, tmp_path):
    lines = "# train shards\n\nr-{000000..000001}.tar\nr-000002.tar\nr-000003.tar\n"
    (shard_dir / "list.txt").write_text(lines)
    expected = list(range(sum(SHARD_SIZES)))
    assert _all_numbers(f"WebDataset:shard_list={shard_dir}/list.txt") == expected  # relative to the list
    assert _all_numbers(f"WebDataset:shard_list={server.url}/list.txt") == expected  # relative to its URL
    wrong = {"shardlist": [{"url": str(shard_dir / "r-000000.tar"), "nsamples": 6}]}
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    dataset = make_dataset(f"WebDataset:shard_list={tmp_path}/wrong.json")
    assert len(dataset) == 6
    with pytest.raises(DatasetFormatError, match="holds 5 samples but its shard list says 6"):
        list(dataset)
    (tmp_path / "bad.json").write_text(json.dumps({"shardlist": [{"nsamples": 3}]}))
    with pytest.raises(DatasetFormatError, match=r'shardlist\[0\] has no "url"'):
        make_dataset(f"WebDataset:shard_list={tmp_path}/bad.json")
