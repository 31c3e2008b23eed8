"""Ages (max_age) and backup names: the time words users give."""
from datetime import datetime, timezone

import pytest

from guestvault_engine.errors import ConfigError
from guestvault_engine.times import format_time, parse_age, parse_time


@pytest.mark.parametrize('text, seconds', [
    ('90', 90), (90, 90), ('90s', 90), ('30m', 1800), ('12h', 43200), ('1d', 86400),
    ('2w', 1209600), ('1.5h', 5400), (' 12H ', 43200), ('0.5', 0.5),
    ('24h5m', 86700), ('1d2h', 93600), ('1h30m15s', 5415),
])
def test_an_age_is_seconds_with_an_optional_unit(text, seconds):
    assert parse_age(text) == seconds


@pytest.mark.parametrize('text', ['soon', '', '0', '0s', '-1h', '12x', 'h', '1e999', 'nan', 'inf',
                                  '24h 5m', '5m24', 'h5m'])
def test_a_bad_age_names_the_option_and_the_accepted_forms(text):
    with pytest.raises(ConfigError, match=r"max_age .* is not an age: .*s, m, h, d or w"):
        parse_age(text)


@pytest.mark.parametrize('text', ['0', '0s', '0h0m'])
def test_a_grace_may_be_zero_when_the_caller_allows_it(text):
    assert parse_age(text, 'grace', allow_zero=True) == 0


def test_a_negative_grace_is_still_refused():
    with pytest.raises(ConfigError, match=r"grace '-1s' is not an age: use a number of seconds "
                                          r"\(0 or more\)"):
        parse_age('-1s', 'grace', allow_zero=True)


def test_backup_names_are_utc_seconds_and_read_back():
    moment = datetime(2026, 3, 10, 3, 0, 0, 987654,
                      tzinfo=timezone.utc).astimezone(timezone.utc)
    assert format_time(moment) == '2026-03-10T03:00:00Z'
    assert parse_time('2026-03-10T03:00:00Z') == moment.replace(microsecond=0)
    with pytest.raises(ValueError):
        parse_time('2026-03-10T03:00:00+02:00')
