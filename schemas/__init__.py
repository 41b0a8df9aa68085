"""The data contract as pydantic models and the JSON Schema files generated from them."""
