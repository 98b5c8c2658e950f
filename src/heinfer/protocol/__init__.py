"""Wire protocols around heinfer's encrypted bodies that both the service and callers speak."""

__all__: list[str] = []
