"""The tenants of this folder's shared server (conftest.py starts it), and their keys."""

MODEL = "smollm2"  # the tests use this name
PUBLIC = ("pub", "public-ones")  # the operator's public vectors in the server's store (conftest.py)
KEYS = {"alice": "sk-alice-edge-key", "bob": "sk-bob-edge-key", "carol": "sk-carol-test-key", "dave": "sk-dave-test-key",
        "erin": "sk-erin-hostile-key", "frank": "sk-frank-bystander-key"}
TENANTS = {
    "alice": {"keys": [KEYS["alice"]]},
    "bob": {"keys": [KEYS["bob"]], "max_configs_in_flight": 1},
    "carol": {"keys": [KEYS["carol"]], "max_vectors": 2},
    "dave": {"keys": [KEYS["dave"]], "max_configs_in_flight": 1},
    "erin": {"keys": [KEYS["erin"]]},  # test_hostile.py's hostile tenant
    "frank": {"keys": [KEYS["frank"]]},  # and its bystander
}


def auth(who: str) -> dict:
    """The Authorization header of tenant ``who``."""
    return {"Authorization": f"Bearer {KEYS[who]}"}
