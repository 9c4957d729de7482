"""The typed API client against a live berth."""

import pytest

from berth import Berth, BerthError


def test_boxes_exec_files(api: Berth, box: str):
    assert api.get_box(box)["state"] == "running"
    assert box in [b["id"] for b in api.list_boxes()]
    r = api.exec(box, ["sh", "-c", "echo hi; echo err >&2; exit 3"])
    assert (r["exit_code"], r["stdout"], r["stderr"]) == (3, "hi\n", "err\n")
    api.write_file(box, "dir/a b.txt", "content")
    assert api.read_file(box, "dir/a b.txt") == b"content"
    assert [e["name"] for e in api.list_dir(box, "dir")["entries"]] == ["a b.txt"]
    api.delete_file(box, "dir/a b.txt")
    with pytest.raises(BerthError) as e:
        api.read_file(box, "dir/a b.txt")
    assert e.value.status == 404 and e.value.code


def test_sessions_and_events_resume_from_a_seq(api: Berth, box: str):
    s = api.create_session({"kind": "command", "argv": ["sh", "-c", "echo one; echo two"]}, box=box)
    events = list(api.events(s["id"]))
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "gapless from 1"
    outs = [e["data"] for e in events if e["type"] == "stdout"]
    assert outs, events
    # Resuming after a seq gives exactly the rest.
    later = list(api.events(s["id"], after=seqs[1]))
    assert [e["seq"] for e in later] == seqs[2:]
    assert api.get_session(s["id"])["state"] in ("stopped", "failed")
    assert s["id"] in [x["id"] for x in api.list_sessions(box)]


def test_usage_and_errors(api: Berth):
    assert "groups" in api.usage(group_by="box")
    with pytest.raises(BerthError) as e:
        api.get_session("ses_does_not_exist")
    assert e.value.status == 404
    with pytest.raises(BerthError) as e:
        Berth(api.url, "wrong-key").list_boxes()
    assert e.value.status == 401
