"""The README stays true: its RFC table covers every RFC the code cites, and
.ci/run runs the README's test command."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_rfc_cited_in_code_is_in_the_readme_table():
    cited = set()
    for path in list((ROOT / "mailgw").rglob("*.py")) + [ROOT / "mailgw" / "default.toml"]:
        cited |= set(re.findall(r"RFC (\d+)", path.read_text(encoding="utf-8")))
    table = "\n".join(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| RFC"))
    listed = set(re.findall(r"RFC (\d+)", table))
    assert cited, "the code cites no RFC at all?"
    assert not cited - listed, f"RFCs cited in mailgw/ but missing from README's RFC table: {sorted(cited - listed, key=int)}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("Install and run the tests", 1)[1]
    command = re.search(r"```sh\n(.+?)\n```", section, re.S).group(1).strip()
    # .ci/run extracts the command from the README itself; check it finds this one.
    extracted = subprocess.run(
        ["sed", "-n", r"/^Install and run the tests/,/^```$/{/^apt-get/p}", "README.md"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert extracted == command
    assert "sed -n '/^Install and run the tests/" in (ROOT / ".ci" / "run").read_text()
