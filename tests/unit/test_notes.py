"""notes-template expansion, as Proxmox vzdump does it."""

import pytest

from guestvault_engine.policy import notes
from guestvault_engine.errors import ConfigError, NotesTemplateError

VALUES = {"cluster": "prod", "guestname": "mail", "node": "kvm1", "vmid": 105}


def test_all_four_variables_are_replaced():
    text = notes.render_notes("{{guestname}} ({{vmid}}) on {{node}} in {{cluster}}", VALUES)
    assert text == "mail (105) on kvm1 in prod"


def test_variables_are_exactly_the_proxmox_ones():
    assert notes.NOTES_VARIABLES == ("cluster", "guestname", "node", "vmid")


def test_a_variable_may_appear_several_times():
    assert notes.render_notes("{{vmid}}-{{vmid}}", VALUES) == "105-105"


def test_backslash_n_becomes_a_newline():
    assert notes.render_notes(r"first\nsecond", VALUES) == "first\nsecond"


def test_double_backslash_becomes_one_backslash():
    assert notes.render_notes(r"C:\\backups", VALUES) == "C:\\backups"


def test_escaped_backslash_before_n_is_not_a_newline():
    assert notes.render_notes(r"a\\nb", VALUES) == "a\\nb"


def test_other_escapes_are_rejected_with_what_is_allowed():
    with pytest.raises(NotesTemplateError) as err:
        notes.render_notes(r"tab\there", VALUES)
    assert r"'\t'" in str(err.value)
    assert r"'\n'" in str(err.value) and r"'\\'" in str(err.value)


def test_a_trailing_lone_backslash_is_kept_like_proxmox():
    assert notes.render_notes("end\\", VALUES) == "end\\"


def test_unknown_variable_names_it_and_lists_the_known_ones():
    with pytest.raises(NotesTemplateError) as err:
        notes.render_notes("{{guestname}} {{hostname}}", VALUES)
    message = str(err.value)
    assert "{{hostname}}" in message
    for name in notes.NOTES_VARIABLES:
        assert "{{%s}}" % name in message


def test_notes_template_error_is_a_config_error():
    with pytest.raises(ConfigError):
        notes.render_notes("{{nope}}", VALUES)


def test_spaces_inside_braces_are_left_as_text_like_proxmox():
    assert notes.render_notes("{{ vmid }}", VALUES) == "{{ vmid }}"


def test_variable_names_are_case_sensitive():
    with pytest.raises(NotesTemplateError, match="VMID"):
        notes.render_notes("{{VMID}}", VALUES)


def test_single_braces_are_text():
    assert notes.render_notes("{vmid} {{vmid}", VALUES) == "{vmid} {{vmid}"


def test_escapes_are_expanded_before_variables():
    # As in PVE::VZDump: "\n" inside braces becomes a newline first, so this is plain text.
    assert notes.render_notes(r"{{a\nb}}", VALUES) == "{{a\nb}}"


def test_a_value_that_looks_like_a_variable_is_inserted_verbatim():
    values = dict(VALUES, guestname="{{node}}")
    assert notes.render_notes("{{guestname}}", values) == "{{node}}"


def test_a_value_with_backslashes_is_not_unescaped():
    values = dict(VALUES, guestname=r"a\nb")
    assert notes.render_notes("{{guestname}}", values) == r"a\nb"


def test_missing_or_none_values_become_empty_like_a_standalone_proxmox_node():
    assert notes.render_notes("[{{cluster}}]", {"vmid": 105}) == "[]"
    assert notes.render_notes("[{{cluster}}]", dict(VALUES, cluster=None)) == "[]"


def test_values_for_unknown_variables_are_a_programming_error():
    with pytest.raises(ValueError, match="hostname"):
        notes.render_notes("x", {"hostname": "mail"})


def test_a_literal_line_break_is_rejected_with_the_escape_to_use():
    with pytest.raises(NotesTemplateError, match=r"\\n"):
        notes.render_notes("one\ntwo", VALUES)


def test_templates_longer_than_proxmox_allows_are_rejected():
    with pytest.raises(NotesTemplateError, match="1024"):
        notes.render_notes("x" * 1025, VALUES)
    assert notes.render_notes("x" * 1024, VALUES) == "x" * 1024


def test_errors_say_where_the_template_came_from():
    with pytest.raises(NotesTemplateError, match="jobs.cfg line 4"):
        notes.render_notes("{{nope}}", VALUES, what="jobs.cfg line 4: notes-template")


def test_check_accepts_a_valid_template_and_rejects_a_broken_one():
    notes.check_notes_template(r"{{guestname}}\n{{vmid}}")
    with pytest.raises(NotesTemplateError):
        notes.check_notes_template("{{name}}")
