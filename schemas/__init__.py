"""The data contract as pydantic models and the JSON Schema files generated from them."""

from schemas.device import DEVICE_ID_PATTERN, Device, DeviceType, is_device_id

__all__ = ["DEVICE_ID_PATTERN", "Device", "DeviceType", "is_device_id"]
