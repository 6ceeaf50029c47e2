"""Home Assistant's documented MQTT discovery schema, for the tests that check what the device announces.

Transcribed from Home Assistant 2025.4 (``homeassistant/components/mqtt``: ``abbreviations.py``,
``schemas.py`` ``DEVICE_DISCOVERY_SCHEMA``, ``config.py`` and the ``binary_sensor``, ``sensor``,
``switch`` and ``event`` platform schemas), the release line whose documentation describes
device-based discovery. A key Home Assistant does not know is dropped by its schema without a
word, so a misspelt abbreviation would be an entity silently missing its state: every key is
checked here, and the required ones must be there."""

from __future__ import annotations

import re
from typing import Any

# abbreviation -> full key (the subset of ABBREVIATIONS for the keys below)
ABBREVIATIONS = {
    'avty': 'availability',
    'avty_mode': 'availability_mode',
    'avty_t': 'availability_topic',
    'avty_tpl': 'availability_template',
    'cmd_t': 'command_topic',
    'cmd_tpl': 'command_template',
    'cmps': 'components',
    'dev': 'device',
    'dev_cla': 'device_class',
    'e': 'encoding',
    'en': 'enabled_by_default',
    'ent_cat': 'entity_category',
    'ent_pic': 'entity_picture',
    'evt_typ': 'event_types',
    'exp_aft': 'expire_after',
    'frc_upd': 'force_update',
    'ic': 'icon',
    'json_attr_t': 'json_attributes_topic',
    'json_attr_tpl': 'json_attributes_template',
    'lrst_val_tpl': 'last_reset_value_template',
    'name': 'name',
    'o': 'origin',
    'obj_id': 'object_id',
    'off_dly': 'off_delay',
    'ops': 'options',
    'opt': 'optimistic',
    'p': 'platform',
    'pl_avail': 'payload_available',
    'pl_not_avail': 'payload_not_available',
    'pl_off': 'payload_off',
    'pl_on': 'payload_on',
    'ret': 'retain',
    'stat_cla': 'state_class',
    'stat_off': 'state_off',
    'stat_on': 'state_on',
    'stat_t': 'state_topic',
    'sug_dsp_prc': 'suggested_display_precision',
    't': 'topic',
    'uniq_id': 'unique_id',
    'unit_of_meas': 'unit_of_measurement',
    'val_tpl': 'value_template',
}
DEVICE_ABBREVIATIONS = {'cns': 'connections', 'cu': 'configuration_url', 'ids': 'identifiers', 'name': 'name', 'mf': 'manufacturer', 'mdl': 'model', 'mdl_id': 'model_id', 'hw': 'hw_version', 'sw': 'sw_version', 'sa': 'suggested_area', 'sn': 'serial_number'}
ORIGIN_ABBREVIATIONS = {'name': 'name', 'sw': 'sw_version', 'url': 'support_url'}
DEVICE_KEYS = ['configuration_url', 'connections', 'hw_version', 'identifiers', 'manufacturer', 'model', 'model_id', 'name', 'serial_number', 'suggested_area', 'sw_version', 'via_device']
ORIGIN_KEYS = ['name', 'support_url', 'sw_version']
ROOT_REQUIRED = ['device', 'components', 'origin']
ROOT_OPTIONAL = ['state_topic', 'command_topic', 'qos', 'encoding', 'availability', 'availability_mode', 'availability_template', 'availability_topic', 'payload_available', 'payload_not_available']
COMMON = ['availability', 'availability_mode', 'availability_template', 'availability_topic', 'payload_available', 'payload_not_available', 'device', 'entity_picture', 'origin', 'enabled_by_default', 'entity_category', 'icon', 'json_attributes_topic', 'json_attributes_template', 'object_id', 'unique_id', 'qos', 'encoding', 'platform', 'name']  # every entity platform
PLATFORMS = {  # platform -> (required, optional) beyond COMMON
    'binary_sensor': (['state_topic'], ['value_template', 'device_class', 'expire_after', 'force_update', 'off_delay', 'payload_off', 'payload_on']),
    'sensor': (['state_topic'], ['value_template', 'device_class', 'expire_after', 'force_update', 'last_reset_value_template', 'options', 'suggested_display_precision', 'state_class', 'unit_of_measurement']),
    'switch': (['command_topic'], ['optimistic', 'retain', 'state_topic', 'command_template', 'payload_off', 'payload_on', 'state_off', 'state_on', 'value_template', 'device_class']),
    'event': (['state_topic', 'event_types'], ['value_template', 'device_class']),
}
BINARY_SENSOR_CLASSES = ['battery', 'battery_charging', 'carbon_monoxide', 'cold', 'connectivity', 'door', 'garage_door', 'gas', 'heat', 'light', 'lock', 'moisture', 'motion', 'moving', 'occupancy', 'opening', 'plug', 'power', 'presence', 'problem', 'running', 'safety', 'smoke', 'sound', 'tamper', 'update', 'vibration', 'window']
STATE_CLASSES = ['measurement', 'total', 'total_increasing']
ENTITY_CATEGORIES = ['config', 'diagnostic']
AVAILABILITY_KEYS = ['topic', 'payload_available', 'payload_not_available', 'value_template']
OBJECT_ID = re.compile(r"^[a-zA-Z0-9_-]+$")  # discovery and component ids


def expand(doc: dict[str, Any], table: dict[str, str]) -> dict[str, Any]:
    """``doc`` with abbreviations replaced, as Home Assistant reads it; a key that is neither an
    abbreviation nor a full key fails."""
    full = set(table.values())
    out = {}
    for key, value in doc.items():
        if key not in table and key not in full:
            raise AssertionError(f"{key!r} is not a key Home Assistant knows here")
        out[table.get(key, key)] = value
    return out


def check_device_discovery(payload: dict[str, Any]) -> None:
    """Fail naming the first key or value that Home Assistant's device discovery would not take."""
    root_table = {**ABBREVIATIONS, **{k: k for k in ROOT_REQUIRED + ROOT_OPTIONAL}}
    root = expand(payload, {k: v for k, v in root_table.items() if v in ROOT_REQUIRED + ROOT_OPTIONAL})
    for key in ROOT_REQUIRED:
        assert key in root, f"device discovery needs {key!r}"
    device = expand(root["device"], {**DEVICE_ABBREVIATIONS, **{k: k for k in DEVICE_KEYS}})
    assert device.get("identifiers") or device.get("connections"), "a device needs an identifier"
    origin = expand(root["origin"], {**ORIGIN_ABBREVIATIONS, **{k: k for k in ORIGIN_KEYS}})
    assert isinstance(origin.get("name"), str), "origin needs a name"
    availability_table = ({a: f for a, f in ABBREVIATIONS.items() if f in AVAILABILITY_KEYS}
                          | {k: k for k in AVAILABILITY_KEYS})
    for availability in root.get("availability", []):
        assert "topic" in expand(availability, availability_table), "availability needs a topic"
    assert root.get("qos", 0) in (0, 1, 2)
    for cid, component in root["components"].items():
        assert OBJECT_ID.match(cid), f"component id {cid!r}"
        check_component(cid, component, root)


def check_component(cid: str, component: dict[str, Any], root: dict[str, Any]) -> None:
    platform = component.get("p", component.get("platform"))
    assert platform in PLATFORMS, f"{cid}: platform {platform!r}"
    required, optional = PLATFORMS[platform]
    keys = COMMON + required + optional
    table = {a: f for a, f in ABBREVIATIONS.items() if f in keys} | {k: k for k in keys}
    doc = expand(component, table)
    if len(doc) == 1:
        return  # the platform alone: the component is being removed
    assert isinstance(doc.get("unique_id"), str), f"{cid}: an entity needs a unique_id"
    for key in required:  # a shared option at the root counts
        assert key in doc or key in root, f"{cid}: {platform} needs {key!r}"
    if platform == "binary_sensor" and "device_class" in doc:
        assert doc["device_class"] in BINARY_SENSOR_CLASSES, f"{cid}: device_class {doc['device_class']!r}"
    if platform == "sensor" and "state_class" in doc:
        assert doc["state_class"] in STATE_CLASSES, f"{cid}: state_class {doc['state_class']!r}"
    if "entity_category" in doc:
        assert doc["entity_category"] in ENTITY_CATEGORIES, f"{cid}: entity_category"
    if platform == "event":
        assert doc["event_types"] and all(isinstance(t, str) for t in doc["event_types"])
    for key, value in doc.items():
        if key.endswith("_topic"):
            assert isinstance(value, str) and value and "+" not in value and "#" not in value, f"{cid}: {key}"
        if key.endswith("_template") or key.startswith("payload_") or key.startswith("state_o"):
            assert isinstance(value, str), f"{cid}: {key} must be a string"
