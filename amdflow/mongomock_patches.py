"""What the embedded store adds to mongomock: write tracking (for the journal) and lookups that do not scan.

mongomock keeps a collection as an ordered dict of documents and answers every query by
testing every document, and every unique index by a query per insert. That made the
embedded store quadratic in the campaign: ``amdflow add`` of 1,900 candidates took 113 s
(83 % in the unique-index check), and ``amdflow run`` of them did not finish in 20 minutes
(every check-out, completion and per-candidate update a scan of 8,000 Fireworks or
candidates). Measured on 2 cores, 2026-12-03. So, in every process that opens an embedded
store (:func:`install`, idempotent):

* **Write tracking**: each collection store notes the ``_id`` of every document written
  since the last flush (inserts and deletes through its ``__setitem__``/``__delitem__``,
  updates in place through ``Collection._apply_update_document``/``_apply_update_pipeline``),
  and a drop or rename asks for a full snapshot. :mod:`amdflow.embedded` journals them.
* **Lookup maps**: the first query with an equality (or ``$in`` of plain values) on a field
  builds a map value -> documents for that field, kept exact by the same hooks; later
  queries on that field read only the documents the map names, in the collection's order,
  and test them on the query's other fields (a ``$in`` of 40,000 Fireworks ids, tested
  element by element against each of 14,000 launches, made ``amdflow status`` take 165 s
  at 10k candidates).
  An array of plain values is filed under each element (as MongoDB's multikey indexes
  do: ``{"nodes": 5}`` matches a workflow whose ``nodes`` hold 5); a field that ever holds
  a sub-document, or an array of them, is left to mongomock's scan.
* **Unique indexes** are checked against per-index counts of key values, kept across a run
  of inserts, instead of by a query per insert.
* **Aggregations** that start with ``$match`` read only the matching documents (mongomock
  deep-copies the whole collection first).
* **Cursors** hand out their documents without copying the result list once per document.

The tests compare every kind of query and write with and without the maps.
"""

from __future__ import annotations

import datetime
from typing import Any

_SCALARS = (str, int, float, bool, datetime.datetime)
_MISSING = object()
_UNSAFE = object()


def key_of(doc_id: Any) -> Any:
    """The key mongomock files a document under (a dict ``_id`` is hashed)."""
    from mongomock import helpers

    return helpers.hashdict(doc_id) if isinstance(doc_id, dict) else doc_id


def _is_scalar(value: Any) -> bool:
    from bson import ObjectId

    return isinstance(value, (*_SCALARS, ObjectId))


def _value(doc: Any, path: str) -> Any:
    """The value a map files ``doc`` under for ``path``: a scalar, None, _MISSING, or _UNSAFE (an array on the way,
    or an array / sub-document at the end: MongoDB then matches by element, which a map does not model)."""
    cur = doc
    for part in path.split("."):
        if isinstance(cur, dict):
            if part not in cur:
                return _MISSING
            cur = cur[part]
        elif isinstance(cur, list):
            return _UNSAFE
        else:
            return _MISSING
    if cur is None or _is_scalar(cur):
        return cur
    return _UNSAFE


# --- per collection store: dirty keys, lookup maps, order ------------------------------------------------------------

def _state(store: Any) -> dict[str, Any]:
    st = store.__dict__.get("_amdflow")
    if st is None:
        st = store.__dict__["_amdflow"] = {"maps": {}, "unsafe": set(), "seq": None, "next": 0, "unique": {},
                                           "version": 0, "inserted": None, "keys_unchanged": None}
    return st


def dirty_keys(store: Any) -> dict[Any, None]:
    """Keys written since :func:`clear_dirty` (ordered: new documents in the order they were inserted)."""
    return store.__dict__.get("_amdflow_dirty") or {}


def clear_dirty(store: Any) -> None:
    store.__dict__.pop("_amdflow_dirty", None)
    store.__dict__.pop("_amdflow_meta", None)


def needs_snapshot(store: Any) -> bool:
    return bool(store.__dict__.get("_amdflow_meta"))


def _mark(store: Any, key: Any) -> None:
    dirty = store.__dict__.get("_amdflow_dirty")
    if dirty is None:
        dirty = store.__dict__["_amdflow_dirty"] = {}
    dirty[key] = None
    _state(store)["version"] += 1


def _mark_meta(store: Any) -> None:
    store.__dict__["_amdflow_meta"] = True


def _map_values(doc: Any, path: str) -> list[Any] | None:
    """The values a map files ``doc`` under: its scalar (or None, or _MISSING), or each element of an array of scalars
    (a multikey index: ``{path: v}`` matches an array holding v); None when the map cannot model the field."""
    cur = doc
    parts = path.split(".")
    for i, part in enumerate(parts):
        if isinstance(cur, dict):
            if part not in cur:
                return [_MISSING]
            cur = cur[part]
        elif isinstance(cur, list):
            return None
        else:
            return [_MISSING]
        if isinstance(cur, list) and i == len(parts) - 1:
            if all(v is None or _is_scalar(v) for v in cur):
                return list(dict.fromkeys(_tag(v) for v in cur))
            return None
    if cur is None or _is_scalar(cur):
        return [_tag(cur)]
    return None


def _tag(value: Any) -> Any:
    """The value as a map's key. As is: a bucket then holds what mongomock's equality matches (which, like Python,
    takes True == 1 == 1.0, where MongoDB keeps booleans apart from numbers)."""
    return value


def _map_add(st: dict[str, Any], key: Any, doc: Any) -> None:
    for path in list(st["maps"]):
        values = _map_values(doc, path)
        if values is None:
            del st["maps"][path]
            st["unsafe"].add(path)
        else:
            m = st["maps"][path]
            for v in values:
                m.setdefault(v, {})[key] = None


def _map_remove(st: dict[str, Any], key: Any, doc: Any) -> None:
    for path, m in st["maps"].items():
        for v in _map_values(doc, path) or ():
            bucket = m.get(v)
            if bucket is not None:
                bucket.pop(key, None)
                if not bucket:
                    del m[v]


def _build_map(store: Any, st: dict[str, Any], path: str) -> dict[Any, dict[Any, None]] | None:
    if st["seq"] is None:
        st["seq"] = {k: i for i, k in enumerate(store._documents)}
        st["next"] = len(st["seq"])
    m: dict[Any, dict[Any, None]] = {}
    for key, doc in store._documents.items():
        values = _map_values(doc, path)
        if values is None:
            st["unsafe"].add(path)
            return None
        for v in values:
            m.setdefault(v, {})[key] = None
    st["maps"][path] = m
    return m


def planned_keys(store: Any, query: Any) -> tuple[list[Any], str] | None:
    """The keys of the documents that can match ``query``, in collection order, from the narrowest usable map, and the
    field that map answered exactly; None when no field of the query can use one (then every document is tested).

    A map's bucket holds exactly the documents mongomock's equality (or element equality, for an array) matches:
    plain values by Python's ``==`` and hash; a NaN (never equal to itself) is never looked up."""
    if not isinstance(query, dict) or not query:
        return None
    st = _state(store)
    best: dict[Any, None] | None = None
    best_path = ""
    for path, cond in query.items():
        if not isinstance(path, str) or path.startswith("$") or path in st["unsafe"]:
            continue
        if isinstance(cond, dict):
            if len(cond) != 1 or "$in" not in cond or not isinstance(cond["$in"], (list, tuple)):
                continue
            values = cond["$in"]
            if not all(_is_scalar(v) for v in values):
                continue
        elif _is_scalar(cond):
            values = [cond]
        else:  # None (also matches a missing field), regex, sub-document, array: mongomock's scan
            continue
        if any(v != v for v in values):  # NaN
            continue
        values = [_tag(v) for v in values]
        m = st["maps"].get(path)
        if m is None:
            m = _build_map(store, st, path)
            if m is None:
                continue
        if len(values) == 1:
            keys = m.get(values[0], {})
        else:
            keys = {}
            for v in values:
                keys.update(m.get(v, {}))
        if best is None or len(keys) < len(best):
            best, best_path = keys, path
            if len(best) <= 1:
                break
    if best is None:
        return None
    seq = st["seq"]
    return sorted(best, key=seq.__getitem__), best_path


# --- unique indexes ------------------------------------------------------------------------------------------------

def _unique_values(doc: Any, fields: list[str]) -> tuple[Any, ...] | None:
    """A document's key under a unique index as mongomock compares it (missing: None); None if not all scalars."""
    out = []
    for f in fields:
        v = _value(doc, f)
        if v is _UNSAFE:
            return None
        out.append(None if v is _MISSING else v)
    return tuple(out)


def _unique_keys(store: Any, doc: Any) -> list[Any] | None:
    """The document's keys under every unique index (None when one is sparse, partial or not scalar)."""
    out = []
    for index in store.indexes.values():
        if not index.get("unique"):
            continue
        if index.get("sparse") or index.get("partialFilterExpression") is not None:
            return None
        key = _unique_values(doc, [k for k, _ in index.get("key")])
        if key is None:
            return None
        out.append(key)
    return out


def _ensure_uniques(collection: Any, new_data: Any, slow: Any) -> None:
    """mongomock's unique-index check from per-index counts of key values: updated by one after an insert, rebuilt
    after any other write; a sparse or partial index, or a non-scalar key, goes to mongomock's own check."""
    from pymongo.errors import DuplicateKeyError

    store = collection._store
    st = _state(store)
    version = st["version"]
    doc_key = key_of(new_data.get("_id"))
    caches = st["unique"]
    if st.get("keys_unchanged") == (version, doc_key):  # an update that changed no unique key: nothing to check
        st["unique"] = {n: (version, e[1]) for n, e in caches.items() if e[0] == version - 1}  # still exact
        return None
    just_inserted = st["inserted"] == (version, doc_key)
    for name, index in list(store.indexes.items()):
        if not index.get("unique"):
            continue
        if index.get("sparse") or index.get("partialFilterExpression") is not None:
            return slow(collection, new_data)
        fields = [k for k, _ in index.get("key")]
        key = _unique_values(new_data, fields)
        if key is None:
            caches.clear()
            return slow(collection, new_data)
        entry = caches.get(name)
        if entry is not None and just_inserted and entry[0] == version - 1:
            counts = entry[1]
            counts[key] = counts.get(key, 0) + 1
        else:
            counts = {}
            for doc in store._documents.values():
                k = _unique_values(doc, fields)
                if k is None:
                    caches.clear()
                    return slow(collection, new_data)
                counts[k] = counts.get(k, 0) + 1
        caches[name] = (version, counts)
        if counts.get(key, 0) > 1:
            caches.clear()  # the caller rolls the write back: every count is rebuilt at the next check
            raise DuplicateKeyError("E11000 Duplicate Key Error", 11000)
    return None


# --- installation ----------------------------------------------------------------------------------------------------

def install() -> None:
    """Wrap mongomock's write and read paths once per process (idempotent).

    Other mongomock users in the process (the tests' shared store) get the same behaviour:
    the maps only narrow which documents are tested.
    """
    import mongomock.collection
    import mongomock_persistence  # noqa: F401 - patches the stores for (de)serialization; must come first
    from mongomock.filtering import filter_applies
    from mongomock.store import CollectionStore, DatabaseStore

    if getattr(CollectionStore, "_amdflow_installed", False):
        return
    set_item, del_item, drop = CollectionStore.__setitem__, CollectionStore.__delitem__, CollectionStore.drop
    rename = DatabaseStore.rename
    coll_cls = mongomock.collection.Collection
    apply_doc, apply_pipeline = coll_cls._apply_update_document, coll_cls._apply_update_pipeline
    slow_uniques, iter_documents, aggregate = coll_cls._ensure_uniques, coll_cls._iter_documents, coll_cls.aggregate

    def __setitem__(self: Any, key: Any, val: Any) -> None:
        st = _state(self)
        old = self._documents.get(key, _MISSING)
        if old is not _MISSING:
            _map_remove(st, key, old)
        set_item(self, key, val)
        _map_add(st, key, val)
        if old is _MISSING and st["seq"] is not None:
            st["seq"][key] = st["next"]
            st["next"] += 1
        _mark(self, key)
        st["inserted"] = (st["version"], key) if old is _MISSING else None

    def __delitem__(self: Any, key: Any) -> None:
        st = _state(self)
        old = self._documents.get(key, _MISSING)
        del_item(self, key)
        if old is not _MISSING:
            _map_remove(st, key, old)
        if st["seq"] is not None:
            st["seq"].pop(key, None)
        _mark(self, key)

    def _drop(self: Any) -> None:
        drop(self)
        self.__dict__.pop("_amdflow", None)
        _mark_meta(self)

    def _rename(self: Any, name: Any, new_name: Any) -> None:
        rename(self, name, new_name)
        for coll_store in self._collections.values():
            _mark_meta(coll_store)

    def _in_place(apply: Any) -> Any:
        def wrapped(self: Any, existing_document: Any, *args: Any, **kwargs: Any) -> Any:
            store = self._store
            key = key_of(existing_document.get("_id"))
            stored = store._documents.get(key) is existing_document  # not an upsert's document, not yet stored
            st = _state(store)
            if stored:
                _map_remove(st, key, existing_document)
                before = _unique_keys(store, existing_document)
            try:
                return apply(self, existing_document, *args, **kwargs)
            finally:
                if stored:
                    _map_add(st, key, existing_document)
                    _mark(store, key)
                    unchanged = before is not None and before == _unique_keys(store, existing_document)
                    st["keys_unchanged"] = (st["version"], key) if unchanged else None

        return wrapped

    def _iter_documents(self: Any, filter: Any) -> Any:
        plan = planned_keys(self._store, filter)
        if plan is None:
            return iter_documents(self, filter)
        keys, exact = plan
        docs = self._store._documents
        rest = {k: v for k, v in filter.items() if k != exact}  # the map answered that field exactly (e.g. a long $in)
        if not rest:
            return (docs[k] for k in keys if k in docs)
        return (docs[k] for k in keys if k in docs and filter_applies(rest, docs[k]))

    def _aggregate(self: Any, pipeline: Any, session: Any = None, **kwargs: Any) -> Any:
        first = pipeline[0] if pipeline else None
        if isinstance(first, dict) and list(first) == ["$match"] and planned_keys(self._store, first["$match"]) is not None:
            from mongomock import aggregate as mongomock_aggregate

            return mongomock_aggregate.process_pipeline(list(self.find(first["$match"])), self.database, pipeline[1:], session)
        return aggregate(self, pipeline, session=session, **kwargs)

    def _ensure(self: Any, new_data: Any) -> None:
        _ensure_uniques(self, new_data, slow_uniques)

    cursor_cls = mongomock.collection.Cursor

    def _next(self: Any) -> Any:
        # mongomock's Cursor.__next__ slices its whole result list again for every document it returns (skip/limit),
        # so reading a cursor of N documents cost N^2/2 copies: 30 s of `amdflow status` for 41,000 Fireworks. The
        # page is kept while the results, the query and skip/limit are the same.
        page = self.__dict__.get("_amdflow_page")
        if (page is None or page[0] is not self._results or page[1] != (self._skip, self._limit)
                or self._factory_last_generated_results is not self._factory):
            results = self._compute_results(with_limit_and_skip=True)
            page = self.__dict__["_amdflow_page"] = (self._results, (self._skip, self._limit), results)
        try:
            doc = page[2][self._emitted]
        except IndexError as err:
            raise StopIteration() from err
        self._emitted += 1
        return doc

    cursor_cls.__next__ = _next
    CollectionStore.__setitem__ = __setitem__  # type: ignore[method-assign]
    CollectionStore.__delitem__ = __delitem__  # type: ignore[method-assign]
    CollectionStore.drop = _drop  # type: ignore[method-assign]
    DatabaseStore.rename = _rename  # type: ignore[method-assign]
    coll_cls._apply_update_document = _in_place(apply_doc)
    coll_cls._apply_update_pipeline = _in_place(apply_pipeline)
    coll_cls._iter_documents = _iter_documents
    coll_cls._ensure_uniques = _ensure
    coll_cls.aggregate = _aggregate
    CollectionStore._amdflow_installed = True  # type: ignore[attr-defined]
