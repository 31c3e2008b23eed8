"""Ages (max_age) and backup names: the time words users give."""
from datetime import datetime, timezone

import pytest

from guestvault_engine.errors import ConfigError
from guestvault_engine.times import format_time, parse_age, parse_time


@pytest.mark.parametrize('text, seconds', [
    ('90', 90), (90, 90), ('90s', 90), ('30m', 1800), ('12h', 43200), ('1d', 86400),
    ('2w', 1209600), ('1.5h', 5400), (' 12H ', 43200), ('0.5', 0.5),
])
def test_an_age_is_seconds_with_an_optional_unit(text, seconds):
    assert parse_age(text) == seconds


@pytest.mark.parametrize('text', ['soon', '', '0', '-1h', '12x', 'h', '1e999', 'nan', 'inf'])
def test_a_bad_age_names_the_option_and_the_accepted_forms(text):
    with pytest.raises(ConfigError, match=r"max_age .* is not an age: .*s, m, h, d or w"):
        parse_age(text)


def test_backup_names_are_utc_seconds_and_read_back():
    moment = datetime(2026, 3, 10, 3, 0, 0, 987654,
                      tzinfo=timezone.utc).astimezone(timezone.utc)
    assert format_time(moment) == '2026-03-10T03:00:00Z'
    assert parse_time('2026-03-10T03:00:00Z') == moment.replace(microsecond=0)
    with pytest.raises(ValueError):
        parse_time('2026-03-10T03:00:00+02:00')
