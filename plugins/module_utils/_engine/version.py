"""The collection's version, recorded in every manifest (kept equal to galaxy.yml's)."""
TOOL_VERSION = '0.1.0'
