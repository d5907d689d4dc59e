"""A string mapping over Qt's QSettings (passed in, so this file needs no Qt to import): where the
panel keeps answers that must outlive a session, such as licences accepted per model."""

from __future__ import annotations

from typing import Any, Callable, Iterator, MutableMapping


class SettingsStore(MutableMapping[str, str]):
    def __init__(self, settingsFactory: Callable[[], Any], group: str) -> None:
        self._factory = settingsFactory
        self.group = group

    def _key(self, key: str) -> str:
        return f"{self.group}/{key}"

    def __getitem__(self, key: str) -> str:
        value = self._factory().value(self._key(key))
        if not value:
            raise KeyError(key)
        return str(value)

    def __setitem__(self, key: str, value: str) -> None:
        self._factory().setValue(self._key(key), str(value))

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self._factory().remove(self._key(key))

    def __iter__(self) -> Iterator[str]:
        settings = self._factory()
        prefix = f"{self.group}/"
        return iter([k[len(prefix) :] for k in settings.allKeys() if str(k).startswith(prefix)])

    def __len__(self) -> int:
        return len(list(iter(self)))
