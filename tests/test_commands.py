"""`fedjax envoys|experiments|audit` against a real director: plaintext with an envoy and a finished experiment,
and mTLS with api, admin and refused identities (each command's output and exit code)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from fedjax_core import FLExperiment, Federation, ModelInterface, cli, commands, pki
from fedjax_core.runtime.model_tensors import state_to_tensors
from fl_experiment import SubsetDataset, create_train_state, make_tasks
from processes import Stack, free_port


def fedjax(*argv: str) -> tuple[int, str, str]:
    """Run one `fedjax ...` command in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    args = cli.build_parser().parse_args(list(argv))
    code = commands.run(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A plaintext director, one envoy, and experiment 'twice' finished after 2 rounds."""
    stack = Stack(tmp_path_factory.mktemp("plain"), n_envoys=1)
    try:
        stack.start()
        fed = stack.federation()
        exp = FLExperiment(federation=fed, experiment_name="twice")
        exp.start(model_provider=ModelInterface(model=create_train_state()), task_keeper=make_tasks(),
                  data_loader=SubsetDataset(limit=64), rounds_to_train=2)
        exp.stream_metrics(tensorboard_logs=False, progress=False, live_table=False)
        yield stack, exp
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


def plain(stack: Stack) -> list[str]:
    return ["-dh", "127.0.0.1", "-dp", str(stack.port), "--disable-tls"]


def test_envoys_and_experiments_are_listed_as_tables_and_json(finished):
    stack, exp = finished
    code, out, _ = fedjax("envoys", "list", *plain(stack))
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:5] == ["envoy", "online", "last", "seen", "train"]
    assert row.split()[:2] == ["env1", "yes"]
    code, out, _ = fedjax("envoys", "list", *plain(stack), "--json")
    [envoy] = json.loads(out)
    registry = stack.federation().get_shard_registry()["env1"]
    assert (envoy["name"], envoy["online"], envoy["train_size"], envoy["valid_size"]) == (
        "env1", True, registry["shard_info"]["n_samples"]["train"], registry["shard_info"]["n_samples"]["valid"])

    code, out, _ = fedjax("experiments", "list", *plain(stack), "--json")
    [listed] = json.loads(out)
    status = exp.get_experiment_status()
    assert (listed["name"], listed["state"], listed["current_round"], listed["rounds"]) == ("twice", "finished", 2, 2)
    assert listed["best_value"] == pytest.approx(status.best_value)
    assert listed["started_at"] >= listed["submitted_at"] > 0
    code, out, _ = fedjax("experiments", "list", *plain(stack))
    assert code == 0 and out.splitlines()[1].split()[:4] == ["twice", "api", "finished", "2/2"]


def test_show_gives_per_round_metrics_participants_and_bytes(finished):
    stack, exp = finished
    code, out, _ = fedjax("experiments", "show", "twice", *plain(stack), "--json")
    assert code == 0
    shown = json.loads(out)
    events = list(stack.federation().client.events("twice"))
    aggregated = {e.round: {m.name: m.value for m in e.metrics} for e in events
                  if not e.envoy and e.stage == "aggregated_model_validation"}
    assert [row["round"] for row in shown["rounds"]] == [0, 1, 2]
    for row in shown["rounds"]:
        assert row["validation"] == pytest.approx(aggregated[row["round"]])
    assert [row["participants"] for row in shown["rounds"][:2]] == [["env1"], ["env1"]]
    assert all(row["bytes_uploaded"] > 0 and row["round_time_s"] > 0 for row in shown["rounds"][:2])
    code, out, _ = fedjax("experiments", "show", "twice", *plain(stack))
    assert "state       finished" in out and "round       2 of 2" in out
    assert out.count("env1") >= 2  # each training round's participants


def test_logs_print_every_event_and_follow_ends_with_the_experiment(finished):
    stack, _ = finished
    events = [e for e in stack.federation().client.events("twice") if not e.experiment_done]
    code, out, _ = fedjax("experiments", "logs", "twice", *plain(stack), "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == len(events)
    assert [(x["round"], x["envoy"], x["stage"]) for x in lines] == [(e.round, e.envoy, str(e.stage)) for e in events]
    for follow in ((), ("--follow",)):  # an ended experiment's stream says so, followed or not
        code, out, _ = fedjax("experiments", "logs", "twice", *plain(stack), *follow)
        assert code == 0 and out.splitlines()[-1].endswith("experiment twice finished")
        assert len(out.splitlines()) == len(events) + 1


def test_pull_writes_the_model_as_named_arrays(finished, tmp_path):
    stack, exp = finished
    target = tmp_path / "best.npz"
    code, out, _ = fedjax("experiments", "pull", "twice", *plain(stack), "--which", "best", "--out", str(target))
    assert code == 0 and str(target) in out
    with np.load(target, allow_pickle=False) as saved:
        pulled = {k: saved[k] for k in saved.files}
    expected = state_to_tensors(exp.get_best_model())
    assert sorted(pulled) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(pulled[name], array)
    code, _, err = fedjax("experiments", "pull", "twice", *plain(stack), "--out", str(target))
    assert code == commands.BAD_ARGUMENTS and "--force" in err  # nothing is overwritten unasked
    code, _, _ = fedjax("experiments", "pull", "twice", *plain(stack), "--out", str(target), "--force")
    assert code == 0
    code, _, err = fedjax("experiments", "pull", "twice", *plain(stack), "--out", str(tmp_path / "m.txt"))
    assert code == commands.BAD_ARGUMENTS and ".npz" in err


def test_logs_follow_rides_out_a_director_restart_without_repeating_events():
    from fedjax_core import records as r
    from fedjax_core.api.client import DirectorUnreachable

    events = [r.MetricEvent(round=k, envoy="", stage=r.Stage.AGGREGATED, metrics=(r.Metric("v", "acc", k / 10),))
              for k in range(3)]
    done = r.MetricEvent(round=3, envoy="", stage="", experiment_done=True, state="finished")

    class Restarting:  # the director goes away after two events, then replays everything from the start
        calls = 0

        def events(self, name, timeout_s=None, follow=True):
            self.calls += 1
            if self.calls == 1:
                yield from events[:2]
                raise DirectorUnreachable("cannot reach the director (UNAVAILABLE)", retryable=True)
            yield from [*events, done]

    out, err = io.StringIO(), io.StringIO()
    args = cli.build_parser().parse_args(["experiments", "logs", "x", "--follow", "--json"])
    got = list(commands._followed(Restarting(), "x", True, err, sleep=lambda s: None))
    assert got == [*events, done] and "reconnecting" in err.getvalue()
    assert commands.experiments_logs(type("C", (Restarting,), {"calls": 1})(), args, out, err) == 0
    assert [json.loads(line)["round"] for line in out.getvalue().splitlines()] == [0, 1, 2]
    with pytest.raises(DirectorUnreachable):  # without --follow a broken stream is an error at once
        list(commands._followed(Restarting(), "x", False, err, sleep=lambda s: None))


def test_npz_keeps_any_tensor_name_and_widens_what_numpy_cannot_read(tmp_path):
    import ml_dtypes

    tensors = {"params/Dense 0/kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "file": np.ones(2, np.int32),
               "allow_pickle": np.zeros(1, np.int8), "params/ü/../b": np.array([1.5, -2], ml_dtypes.bfloat16)}
    commands.save_npz(tmp_path / "m.npz", tensors)
    with np.load(tmp_path / "m.npz", allow_pickle=False) as saved:
        assert sorted(saved.files) == sorted([*tensors, commands.DTYPES_ENTRY])
        for name, array in tensors.items():
            np.testing.assert_array_equal(saved[name], array.astype(np.float32) if name.endswith("/b") else array)
        assert json.loads(str(saved[commands.DTYPES_ENTRY])) == {"params/ü/../b": "bfloat16"}
    with pytest.raises(commands.CommandError, match="rename it"):
        commands.save_npz(tmp_path / "n.npz", {commands.DTYPES_ENTRY: np.zeros(1)})
    assert not (tmp_path / "n.npz").exists() and len(list(tmp_path.iterdir())) == 1  # no half file left


def test_failures_have_their_own_exit_codes(finished):
    stack, _ = finished
    code, _, err = fedjax("experiments", "show", "nope", *plain(stack))
    assert code == commands.NOT_FOUND and "no experiment named 'nope'" in err
    code, _, err = fedjax("experiments", "list", "-dh", "127.0.0.1", "-dp", str(free_port()), "--disable-tls")
    assert code == commands.UNREACHABLE and "-dp/--director-port" in err
    code, _, err = fedjax("experiments", "list", "-dh", "10.1.2.3", "--disable-tls")
    assert code == commands.BAD_ARGUMENTS and "not a loopback address" in err
    code, _, err = fedjax("experiments", "list", "-dp", str(stack.port))
    assert code == commands.BAD_ARGUMENTS and "--root-cert-path" in err and "--disable-tls" in err
    code, _, err = fedjax("experiments", "cancel", "twice", *plain(stack))
    assert code == commands.FAILED and "twice" in err  # already finished: refused, with the reason
    with pytest.raises(SystemExit) as exited:  # argparse's own: bad arguments
        cli.build_parser().parse_args(["experiments", "pull", "twice", "--which", "worst", "--out", "x.npz"])
    assert exited.value.code == commands.BAD_ARGUMENTS


def test_the_audit_trail_records_registration_submission_and_download(finished, tmp_path):
    stack, _ = finished
    fedjax("experiments", "pull", "twice", *plain(stack), "--which", "last", "--out", str(tmp_path / "last.npz"))
    code, out, _ = fedjax("audit", *plain(stack), "--json")
    entries = [json.loads(line) for line in out.splitlines()]
    actions = [(e["action"], e["experiment"]) for e in entries]
    assert ("register", "") in actions and ("submit", "twice") in actions and ("download", "twice") in actions
    [submit] = [e for e in entries if e["action"] == "submit"]
    assert submit["actor"] == "api" and submit["peer"].startswith("ipv4:127.0.0.1:")
    assert len(submit["detail"]["bundle_sha256"]) == 64
    assert [e["id"] for e in entries] == sorted(e["id"] for e in entries)
    # the envoy's own record: it ran the bundle whose hash the director recorded at submission
    envoy_log = [json.loads(line) for line in
                 (stack.workdir / "envoy_workspace" / "env1" / "audit.jsonl").read_text().splitlines()]
    [ran] = [e for e in envoy_log if e["action"] == "run"]
    assert (ran["experiment"], ran["submitter"], ran["bundle_sha256"], ran["approved"]) == (
        "twice", "api", submit["detail"]["bundle_sha256"], "automatically")
    assert [e["code"] for e in envoy_log if e["action"] == "worker_exit"] in ([], [0])  # ends after the experiment
    code, out, _ = fedjax("audit", *plain(stack), "--since", "0s")  # from now on: nothing yet
    assert code == 0 and out.strip() == "no audit entries since then"


def test_mtls_identities_see_what_their_role_allows_and_refusals_are_audited(tmp_path):
    stack = Stack(tmp_path, n_envoys=1, tls=True,
                  director_settings={"submitters": ["api", "alice", "auditor"], "admins": ["auditor"],
                                     "audit_log": str(tmp_path / "audit.jsonl")})
    for name, role in (("alice", pki.API), ("ops", pki.ADMIN), ("mallory", pki.API), ("auditor", pki.API)):
        pki.certify(stack.pki, name, role=role)
    try:
        stack.start_director()  # no envoy online: the experiment waits in the queue

        def as_(name: str, *argv: str) -> tuple[int, str, str]:
            return fedjax(*argv, "-dh", "127.0.0.1", "-dp", str(stack.port), "-rc", str(stack.pki / "root_ca.crt"),
                          "-pc", str(stack.pki / f"{name}.crt"), "-pk", str(stack.pki / f"{name}.key"))

        alice = Federation(director_node_fqdn="127.0.0.1", director_port=stack.port, tls=True,
                           cert_chain=str(stack.pki / "root_ca.crt"), api_cert=str(stack.pki / "alice.crt"),
                           api_private_key=str(stack.pki / "alice.key"))
        model = create_train_state()
        FLExperiment(federation=alice, experiment_name="alices").start(
            model_provider=ModelInterface(model=model), task_keeper=make_tasks(),
            data_loader=SubsetDataset(limit=64), rounds_to_train=1)

        code, out, _ = as_("alice", "experiments", "list", "--json")
        assert code == 0 and [x["name"] for x in json.loads(out)] == ["alices"]
        code, out, _ = as_("api", "experiments", "list", "--json")  # another submitter sees none of it
        assert code == 0 and json.loads(out) == []
        code, _, err = as_("api", "experiments", "show", "alices")
        assert code == commands.NOT_FOUND and "among yours" in err
        code, _, err = as_("mallory", "experiments", "list")  # an api certificate not in settings.submitters
        assert code == commands.NOT_ALLOWED and "settings.submitters" in err
        code, _, err = as_("env1", "envoys", "list")  # an envoy's certificate is not a notebook's
        assert code == commands.NOT_ALLOWED and "needs role api" in err

        pulled = tmp_path / "initial.npz"
        code, _, _ = as_("alice", "experiments", "pull", "alices", "--which", "last", "--out", str(pulled))
        assert code == 0
        with np.load(pulled) as saved:
            for name, array in state_to_tensors(model).items():
                np.testing.assert_array_equal(saved[name], array)
        code, out, _ = as_("alice", "envoys", "list")
        assert code == 0 and out == "no envoy has registered with this director\n"
        code, out, _ = as_("alice", "experiments", "logs", "alices")  # queued: no event yet
        assert code == 0 and out == ""
        code, _, err = as_("api", "experiments", "logs", "alices")
        assert code == commands.NOT_FOUND
        code, out, _ = as_("ops", "experiments", "list", "--json")  # an admin sees every experiment
        assert [x["name"] for x in json.loads(out)] == ["alices"]
        code, out, _ = as_("ops", "experiments", "cancel", "alices")
        assert code == 0 and "cancelled" in out

        code, out, _ = as_("ops", "audit", "--json")
        entries = [json.loads(line) for line in out.splitlines()]
        seen = [(e["action"], e["actor"], e["experiment"]) for e in entries]
        assert ("submit", "alice", "alices") in seen and ("download", "alice", "alices") in seen
        assert ("cancel", "ops", "alices") in seen
        refusals = {e["actor"]: e["detail"]["reason"] for e in entries if e["action"] == "refuse"}
        assert "settings.submitters" in refusals["mallory"] and "needs role api" in refusals["env1"]
        code, out, _ = as_("alice", "audit", "--json")  # an api certificate: its own doings and experiments
        mine = [json.loads(line) for line in out.splitlines()]
        assert mine and all(e["actor"] == "alice" or e["experiment"] == "alices" for e in mine)
        assert not any(e["actor"] == "mallory" for e in mine)
        code, out, _ = as_("auditor", "audit", "--json")  # named in settings.admins: every entry, as for ops
        assert [json.loads(line) for line in out.splitlines()] == entries
        written = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        assert written == entries  # settings.audit_log holds the same trail
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()
