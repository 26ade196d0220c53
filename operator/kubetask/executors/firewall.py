"""What the dispatcher's firewall rules have in common (`instance_ports.py`,
`platform_ports.py`): chains of kubetask's own, each jumped to first from a built-in one, rules
written with `iptables-restore --noflush`, and a comment naming the dispatcher process that
added each, so the next dispatcher on the host removes those of one killed outright."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence

from .orphans import owner_gone

log = logging.getLogger(__name__)

FAMILIES = ("iptables", "ip6tables")
_OWNER = re.compile(r'--comment "?kubetask p([0-9]+)"?')


def mark() -> str:
    """The match that names this process as a rule's owner."""
    return f'-m comment --comment "kubetask p{os.getpid()}"'


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


def chain(family: str, name: str, hook: str | None = None) -> None:
    """Our chain `name`, jumped to first from `hook` if given (else from our own rules); made
    once per host, kept."""
    if subprocess.run([family, "-w", "-n", "-L", name], capture_output=True).returncode:
        run(family, "-w", "-N", name)
    if (
        hook is not None
        and subprocess.run([family, "-w", "-C", hook, "-j", name], capture_output=True).returncode
    ):
        run(family, "-w", "-I", hook, "-j", name)


def end_orphans(family: str, chains: Sequence[str]) -> None:
    """Removes the rules of dispatchers no longer running, last first: a chain's earlier rules
    may let packets through before its later ones refuse, and must not go before them."""
    for name in chains:
        for rule in reversed(run(family, "-w", "-S", name).splitlines()):
            owner = _OWNER.search(rule)
            if owner is None or not rule.startswith("-A "):
                continue
            if not owner_gone(int(owner.group(1))):
                continue
            subprocess.run([family, "-w", "-D", *shlex.split(rule[3:])], capture_output=True)


async def restore(families: Sequence[str], lines: str) -> None:
    for family in families:
        program = family + "-restore"
        proc = await asyncio.create_subprocess_exec(
            program,
            "-w",
            "--noflush",
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, err = await proc.communicate(lines.encode())
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, program, stderr=err.decode())


def restore_now(families: Sequence[str], lines: str) -> None:
    """`restore`, for code that is not on the event loop."""
    for family in families:
        program = family + "-restore"
        subprocess.run(
            [program, "-w", "--noflush"],
            input=lines, check=True, capture_output=True, text=True, timeout=30,
        )  # fmt: skip


def prepare(each: Callable[[str], None], stays_open: str) -> tuple[list[str], str | None]:
    """Runs `each(family)` for every address family: the families it succeeded for, and why
    not where IPv4's failed (then none is used). IPv6 is used where the host has it; its
    failure is warned about, `stays_open` saying what that leaves."""
    done: list[str] = []
    for family in FAMILIES:
        try:
            if shutil.which(family + "-restore") is None:
                raise FileNotFoundError(f"no {family}-restore on this host")
            each(family)
            done.append(family)
        except (OSError, subprocess.CalledProcessError) as err:
            if family == FAMILIES[0]:
                return [], f"cannot add firewall rules: {said(err)}"
            log.warning("%s: %s; %s", family, said(err), stays_open)
    return done, None


def said(err: BaseException) -> str:
    if isinstance(err, subprocess.CalledProcessError) and err.stderr:
        return str(err.stderr).strip().splitlines()[-1]
    return str(err)


class Chains:
    """Chains of ours, made on first use where this host's firewall may be changed and only
    with `KUBETASK_FUNCTION_USERS=accounts` (a rule can tell a tenant from the platform only
    then); `why_not` says why they are not there."""

    stays_open = "IPv6 stays open"  # what IPv6's chains missing leaves

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._why_not: str | None = None
        self._families: list[str] = []  # those whose chains are there

    def why_not(self) -> str | None:
        self._open()
        return self._why_not

    def _open(self) -> bool:
        if self._families or self._why_not is not None:
            return bool(self._families)
        if not self.enabled:
            self._why_not = "only with KUBETASK_FUNCTION_USERS=accounts"
            return False
        self._families, self._why_not = prepare(self._make, self.stays_open)
        return bool(self._families)

    def _make(self, family: str) -> None:
        """Makes the chains of `family`."""
        raise NotImplementedError


class AccountRules(Chains):
    """Chains with rules of each account's: the guards that enter the chains, added with them,
    and an account's own, added before its first process starts on this dispatcher (`admit`)
    and removed when the dispatcher stops (`close`)."""

    chain_name = ""  # what a warning about its rules names
    purpose = ""  # what adding an account's rules does, for an error: "cannot <purpose>"

    def __init__(self, enabled: bool) -> None:
        super().__init__(enabled)
        self._added: dict[int, asyncio.Future[None]] = {}  # by account user id

    def _guards(self, verb: str) -> str:
        """The rules, with `verb` (`-A`, `-D`), that enter the chains."""
        raise NotImplementedError

    def _account(self, verb: str, uid: int) -> str:
        """The rules, with `verb`, of the account whose user is `uid`."""
        raise NotImplementedError

    async def admit(self, uid: int) -> None:
        """Before the first process of the account whose user is `uid` starts: its rules.
        An account's function is not started without them where they could not be added."""
        if not self._open():
            return
        adding = self._added.get(uid)
        if adding is None:
            # One future per account: two first spawns at once do not add the rules twice.
            adding = self._added[uid] = asyncio.ensure_future(self._add(uid))

            def forget_failed(done: asyncio.Future[None]) -> None:
                if done.cancelled() or done.exception() is not None:
                    self._added.pop(uid, None)  # the account's next process tries again

            adding.add_done_callback(forget_failed)
        await asyncio.shield(adding)

    async def _add(self, uid: int) -> None:
        try:
            await restore(self._families, "*filter\n" + self._account("-A", uid) + "COMMIT\n")
        except (OSError, subprocess.CalledProcessError) as err:
            raise RuntimeError(f"cannot {self.purpose}: {said(err)}") from err

    def close(self) -> None:
        """Removes this dispatcher's rules: its accounts', then the guards."""
        if not self._families:
            return
        accounts = [
            uid
            for uid, f in self._added.items()
            if f.done() and not f.cancelled() and f.exception() is None
        ]
        lines = "".join(self._account("-D", uid) for uid in accounts) + self._guards("-D")
        try:
            restore_now(self._families, "*filter\n" + lines + "COMMIT\n")
        except (OSError, subprocess.CalledProcessError) as err:
            log.warning("%s: its rules stay (%s)", self.chain_name, said(err))
        self._added.clear()


class HostRules:
    """Rules this dispatcher keeps in chain `name` (jumped to from `hook`) for as long as it
    runs: added once at start, removed when it stops, and by the next dispatcher if it is
    killed outright. `rules(family)` gives a family's rules, without `-A chain`."""

    def __init__(self, name: str, hook: str, rules: Callable[[str], list[str]]) -> None:
        self._name = name
        self._hook = hook
        self._rules = rules
        self._added: dict[str, str] = {}  # family -> what was restored

    def add(self) -> str | None:
        """Adds the rules; why not, where IPv4's could not be (IPv6's are warned about)."""

        def each(family: str) -> None:
            rules = self._rules(family)
            lines = "*filter\n" + "".join(f"-A {self._name} {r} {mark()}\n" for r in rules)
            chain(family, self._name, self._hook)
            end_orphans(family, (self._name,))
            if rules:
                restore_now([family], lines + "COMMIT\n")
                self._added[family] = lines + "COMMIT\n"

        return prepare(each, f"its IPv6 rules are not there ({self._name})")[1]

    def remove(self) -> None:
        for family, lines in self._added.items():
            try:
                restore_now([family], lines.replace(f"-A {self._name} ", f"-D {self._name} "))
            except (OSError, subprocess.CalledProcessError) as err:
                log.warning("%s: its rules stay (%s)", self._name, said(err))
        self._added.clear()
