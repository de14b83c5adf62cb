// Fast pybind11 conversion between Python int lists and std::vector<int64_t> (token ids, slots,
// sequence ids). The generic stl.h caster costs ~50 ns per element; this one reads list/tuple
// items directly (~5 ns), which matters for per-step calls carrying hundreds of token ids.
// Any other sequence (not str/bytes) is accepted through PySequence_Fast; an item that is not an
// int (or has no __index__, e.g. a float) or does not fit int64 fails the load, so pybind11
// raises its usual TypeError. Include before pybind11/stl.h in the one translation unit.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace pybind11 {
namespace detail {

template <>
struct type_caster<std::vector<int64_t>> {
  PYBIND11_TYPE_CASTER(std::vector<int64_t>, const_name("list[int]"));

  bool load(handle src, bool /*convert*/) {
    PyObject* obj = src.ptr();
    if (!obj || PyUnicode_Check(obj) || PyBytes_Check(obj) || PyByteArray_Check(obj)) return false;
    object fast;
    if (!PyList_Check(obj) && !PyTuple_Check(obj)) {
      if (!PySequence_Check(obj)) return false;
      fast = reinterpret_steal<object>(PySequence_Fast(obj, ""));
      if (!fast) {
        PyErr_Clear();
        return false;
      }
      obj = fast.ptr();
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
    PyObject** items = PySequence_Fast_ITEMS(obj);
    value.resize(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = items[i];
      long long v;
      if (PyLong_Check(item)) {
        v = PyLong_AsLongLong(item);
      } else {
        if (PyFloat_Check(item)) return false;
        PyObject* index = PyNumber_Index(item);  // numpy integers and other __index__ types
        if (!index) {
          PyErr_Clear();
          return false;
        }
        v = PyLong_AsLongLong(index);
        Py_DECREF(index);
      }
      if (v == -1 && PyErr_Occurred()) {  // does not fit int64
        PyErr_Clear();
        return false;
      }
      value[static_cast<size_t>(i)] = static_cast<int64_t>(v);
    }
    return true;
  }

  static handle cast(const std::vector<int64_t>& src, return_value_policy, handle) {
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(src.size()));
    if (!list) return handle();
    for (size_t i = 0; i < src.size(); ++i) {
      PyObject* x = PyLong_FromLongLong(src[i]);
      if (!x) {
        Py_DECREF(list);
        return handle();
      }
      PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), x);
    }
    return list;
  }
};

}  // namespace detail
}  // namespace pybind11
