"""Write a benchmark's results into its marked section of BENCHMARKS.md."""
import os
import re

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")


def replace_section(name: str, body: str, path: str = BENCHMARKS) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` with `body`."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    section = f"{begin}\n{body.strip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text += f"\n{section}\n"
    with open(path, "w") as f:
        f.write(text)
