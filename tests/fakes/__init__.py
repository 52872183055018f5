"""Local fakes of the vendors' services, speaking their wire protocols, for the real SDKs to talk to."""
