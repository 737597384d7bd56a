"""``resumekit.supervisor.options``: every field of ``SupervisorOptions`` is validated, naming the field; sizes."""

from __future__ import annotations

import pytest

from resumekit.errors import ConfigError
from resumekit.supervisor import SupervisorOptions, parse_size


def test_parse_size():
    assert parse_size("1024") == 1024 and parse_size("2K") == 2048 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("10GB") == 10 * 10**9 and parse_size("500M") == 500 * 2**20 and parse_size("1 TiB") == 2**40
    for bad in ("", "ten", "5Q", "1.2.3G", "-1G", "5i"):
        with pytest.raises(ConfigError, match="cannot read size"):
            parse_size(bad)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"command": []}, "command"),
        ({"command": "python x.py"}, "command"),
        ({"max_restarts": -1}, "max_restarts"),
        ({"crash_loop": 0}, "crash_loop"),
        ({"hang_timeout": 0}, "hang_timeout"),
        ({"grace": -1}, "grace"),
        ({"jitter": 2}, "jitter"),
        ({"backoff": 5, "backoff_max": 1}, "backoff_max"),
        ({"layout": "nope"}, "layout"),
        ({"min_free": -5}, "min_free"),
        ({"gpus": 1.5}, "gpus"),
    ],
)
def test_options_are_validated_with_the_field_named(kwargs, field):
    kw = {"command": ["true"], **kwargs}
    with pytest.raises(ConfigError, match=field if field != "layout" else "unknown layout 'nope'"):
        SupervisorOptions(**kw)
