// Python bindings of the torch-free core: registration only. Method names, argument names and
// defaults match the pure-Python twins (mrt_engine/kv_core_py.py, mrt_engine/step_plan_py.py).
// std::invalid_argument surfaces as ValueError (pybind11's default); mrt::OutOfBlocks as the
// Python class mrt_engine.errors.OutOfBlocks itself, so one `except` catches both backends.
#include <pybind11/pybind11.h>

#include "py_int_list.h"  // before stl.h: the fast list[int] <-> std::vector<int64_t> caster
#include <pybind11/stl.h>

#include "block_pool.h"
#include "cpu_attention.h"
#include "cpu_gemm.h"
#include "cpu_ops.h"
#include "cpu_sampler.h"
#include "kv_cache_manager.h"
#include "step_plan.h"

namespace py = pybind11;
using mrt::BlockPool;
using mrt::KVCacheManager;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mrt-engine C++ core: KV block pool, block tables with fork, prefix cache, step plan";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const mrt::OutOfBlocks& e) {
      // imported per raise: it is rare, and this avoids holding a Python object past finalization
      py::object cls = py::module_::import("mrt_engine.errors").attr("OutOfBlocks");
      py::set_error(cls, e.what());
    }
  });

  py::class_<BlockPool>(m, "BlockPool", "Reference-counted fixed pool of block ids 0..num_blocks-1.")
      .def(py::init<int64_t>(), py::arg("num_blocks"))
      .def_property_readonly("num_blocks", &BlockPool::num_blocks)
      .def("num_free", &BlockPool::num_free)
      .def("ref_count", &BlockPool::ref_count, py::arg("block"))
      .def("allocate", &BlockPool::allocate)
      .def("incref", &BlockPool::incref, py::arg("block"))
      .def("decref", &BlockPool::decref, py::arg("block"),
           "Drop one reference; returns the remaining count. The caller decides where a 0 goes.")
      .def("free", &BlockPool::free, py::arg("block"),
           "decref; a block reaching 0 returns to the free stack.");

  py::class_<KVCacheManager>(m, "KVCacheManager",
                             "Block tables, fork with copy-on-write, and a versioned prefix cache.")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def_property_readonly("num_blocks", &KVCacheManager::num_blocks)
      .def_property_readonly("block_size", &KVCacheManager::block_size)
      .def("num_free_blocks", &KVCacheManager::num_free_blocks)
      .def("num_cached_blocks", &KVCacheManager::num_cached_blocks)
      .def("num_available_blocks", &KVCacheManager::num_available_blocks)
      .def("num_shared_blocks", &KVCacheManager::num_shared_blocks)
      .def("ref_count", &KVCacheManager::ref_count, py::arg("block"))
      .def("has_sequence", &KVCacheManager::has_sequence, py::arg("seq_id"))
      .def("sequence_ids", &KVCacheManager::sequence_ids)
      .def("block_table", &KVCacheManager::block_table, py::arg("seq_id"))
      .def("num_tokens", &KVCacheManager::num_tokens, py::arg("seq_id"))
      .def("token_ids", &KVCacheManager::token_ids, py::arg("seq_id"))
      .def("blocks_needed", &KVCacheManager::blocks_needed, py::arg("seq_id"), py::arg("n"))
      .def("add_sequence", &KVCacheManager::add_sequence, py::arg("seq_id"), py::arg("token_ids"),
           py::arg("version") = 0, py::arg("use_prefix_cache") = true)
      .def("match_prefix", &KVCacheManager::match_prefix, py::arg("token_ids"),
           py::arg("version") = 0)
      .def("append_tokens", &KVCacheManager::append_tokens, py::arg("seq_id"), py::arg("token_ids"))
      .def("append_decode", &KVCacheManager::append_decode, py::arg("seq_ids"),
           py::arg("token_ids"))
      .def("fork", &KVCacheManager::fork, py::arg("parent_id"), py::arg("child_id"), py::arg("at"))
      .def("free_sequence", &KVCacheManager::free_sequence, py::arg("seq_id"))
      .def("take_copies", &KVCacheManager::take_copies)
      .def("cache_sequence", &KVCacheManager::cache_sequence, py::arg("seq_id"))
      .def("drop_version", &KVCacheManager::drop_version, py::arg("version"))
      .def("clear_prefix_cache", &KVCacheManager::clear_prefix_cache)
      .def("cached_versions", &KVCacheManager::cached_versions);

  m.def("plan_decode_groups", &mrt::plan_decode_groups, py::arg("block_tables"),
        py::arg("context_lens"), py::arg("block_size"), py::arg("min_shared_blocks") = 1,
        "CSR partition of decode rows into groups sharing leading full blocks: "
        "(group_ptr, group_rows, group_num_shared).");

  py::class_<mrt::CpuDecodeAttention>(
      m, "CpuDecodeAttention",
      "Decode attention over the paged KV cache for one step's work items (see cpu_attention.h).")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, std::vector<int64_t>,
                    std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>>(),
           py::arg("num_rows"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
           py::arg("block_size"), py::arg("num_cache_blocks"), py::arg("item_row_ptr"), py::arg("item_rows"),
           py::arg("item_block_ptr"), py::arg("item_blocks"), py::arg("item_len"))
      // raw addresses: the caller (mrt_engine/attention/cpu_kernel.py) checks shapes, dtypes,
      // devices and contiguity; this module stays free of torch headers
      .def(
          "run",
          [](mrt::CpuDecodeAttention& self, uintptr_t q, int64_t q_row_stride, int64_t q_head_stride,
             uintptr_t k_cache, uintptr_t v_cache, uintptr_t out, int dtype, float scale, int num_threads,
             bool simd, bool bf16_dot, bool out_bf16) {
            py::gil_scoped_release release;
            self.run(reinterpret_cast<const void*>(q), q_row_stride, q_head_stride,
                     reinterpret_cast<const void*>(k_cache),
                     reinterpret_cast<const void*>(v_cache), reinterpret_cast<void*>(out),
                     static_cast<mrt::KvDtype>(dtype), scale, num_threads, simd, bf16_dot, out_bf16);
          },
          py::arg("q"), py::arg("q_row_stride"), py::arg("q_head_stride"), py::arg("k_cache"), py::arg("v_cache"), py::arg("out"), py::arg("dtype"),
          py::arg("scale"), py::arg("num_threads"), py::arg("simd"), py::arg("bf16_dot"), py::arg("out_bf16") = false)
      .def_property_readonly("num_items", &mrt::CpuDecodeAttention::num_items)
      .def_property_readonly("num_units", &mrt::CpuDecodeAttention::num_units)
      .def_property_readonly("num_tasks", &mrt::CpuDecodeAttention::num_tasks)
      .def_static("simd_available", &mrt::CpuDecodeAttention::simd_available)
      .def_static("bf16_dot_available", &mrt::CpuDecodeAttention::bf16_dot_available);

  m.def(
      "sample_full_softmax",
      [](uintptr_t logits, bool bf16, int64_t num_logit_rows, int64_t vocab, int64_t row_stride, uintptr_t inv_t,
         int64_t num_rows, uintptr_t rows, uintptr_t u, uintptr_t greedy, uintptr_t tokens, uintptr_t logprobs,
         int num_threads, bool simd) {
        py::gil_scoped_release release;
        mrt::sample_full_softmax(reinterpret_cast<const void*>(logits), bf16, num_logit_rows, vocab, row_stride,
                                 reinterpret_cast<const float*>(inv_t), num_rows,
                                 reinterpret_cast<const int64_t*>(rows), reinterpret_cast<const float*>(u),
                                 reinterpret_cast<const uint8_t*>(greedy), reinterpret_cast<int64_t*>(tokens),
                                 reinterpret_cast<float*>(logprobs), num_threads, simd);
      },
      py::arg("logits"), py::arg("bf16"), py::arg("num_logit_rows"), py::arg("vocab"), py::arg("row_stride"),
      py::arg("inv_t"), py::arg("num_rows"), py::arg("rows"), py::arg("u"), py::arg("greedy"), py::arg("tokens"),
      py::arg("logprobs"), py::arg("num_threads"), py::arg("simd"),
      "Fused full-softmax sampling over raw CPU buffers (checked by mrt_engine/sampling_cpu.py).");

  m.def("gemm_bf16_available", &mrt::gemm_bf16_available);
  m.attr("GEMM_PANEL") = mrt::kGemmPanel;
  m.def(
      "gemm_bf16",
      [](uintptr_t a, int64_t lda, int64_t m, int64_t k, uintptr_t w_packed, int64_t n, uintptr_t out, int64_t ldo,
         int num_threads) {
        py::gil_scoped_release release;
        mrt::gemm_bf16(reinterpret_cast<const uint16_t*>(a), lda, m, k, reinterpret_cast<const uint32_t*>(w_packed), n,
                       reinterpret_cast<uint16_t*>(out), ldo, num_threads);
      },
      py::arg("a"), py::arg("lda"), py::arg("m"), py::arg("k"), py::arg("w_packed"), py::arg("n"), py::arg("out"),
      py::arg("ldo"), py::arg("num_threads"),
      "out [m, n] = a [m, k] . w^T, all bf16, w packed as cpu_gemm.h describes (raw CPU buffers).");

  m.def("gemm_f32_available", &mrt::gemm_f32_available);
  m.def(
      "gemm_f32",
      [](uintptr_t a, int64_t lda, int64_t m, int64_t k, uintptr_t w_packed, int64_t n, uintptr_t bias, uintptr_t out,
         int64_t ldo, int num_threads, bool silu_mul, uintptr_t residual, int64_t ldr) {
        py::gil_scoped_release release;
        mrt::gemm_f32(reinterpret_cast<const float*>(a), lda, m, k, reinterpret_cast<const float*>(w_packed), n,
                      reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(out), ldo, num_threads, silu_mul,
                      reinterpret_cast<const float*>(residual), ldr);
      },
      py::arg("a"), py::arg("lda"), py::arg("m"), py::arg("k"), py::arg("w_packed"), py::arg("n"), py::arg("bias"),
      py::arg("out"), py::arg("ldo"), py::arg("num_threads"), py::arg("silu_mul") = false, py::arg("residual") = 0,
      py::arg("ldr") = 0,
      "out [m, n] = a [m, k] . w^T (+ bias; 0 for none) (+ residual [m, n]; 0 for none), all float32, w packed as "
      "cpu_gemm.h describes; silu_mul: out [m, n / 2] = silu(gate) * up of a gated MLP's packed gate/up pairs.");

  m.def("cpu_ops_available", &mrt::cpu_ops_available);
  m.def(
      "rms_norm",
      [](uintptr_t x, int64_t x_stride, uintptr_t w, uintptr_t out, int64_t out_stride, int64_t rows, int64_t hidden,
         float eps, bool bf16, int num_threads) {
        py::gil_scoped_release release;
        mrt::rms_norm(reinterpret_cast<const void*>(x), x_stride, reinterpret_cast<const void*>(w),
                      reinterpret_cast<void*>(out), out_stride, rows, hidden, eps, bf16, num_threads);
      },
      py::arg("x"), py::arg("x_stride"), py::arg("w"), py::arg("out"), py::arg("out_stride"), py::arg("rows"),
      py::arg("hidden"), py::arg("eps"), py::arg("bf16"), py::arg("num_threads"));
  m.def(
      "silu_mul_bf16",
      [](uintptr_t g, uintptr_t u, int64_t in_stride, uintptr_t out, int64_t out_stride, int64_t rows, int64_t n,
         int num_threads) {
        py::gil_scoped_release release;
        mrt::silu_mul_bf16(reinterpret_cast<const uint16_t*>(g), reinterpret_cast<const uint16_t*>(u), in_stride,
                           reinterpret_cast<uint16_t*>(out), out_stride, rows, n, num_threads);
      },
      py::arg("g"), py::arg("u"), py::arg("in_stride"), py::arg("out"), py::arg("out_stride"), py::arg("rows"),
      py::arg("n"), py::arg("num_threads"));

  m.def(
      "rope",
      [](uintptr_t x, int64_t x_stride, uintptr_t cos, uintptr_t sin, uintptr_t out, int64_t rows, int64_t heads,
         int64_t dh, bool bf16, int num_threads) {
        py::gil_scoped_release release;
        mrt::rope(reinterpret_cast<const void*>(x), x_stride, reinterpret_cast<const void*>(cos),
                  reinterpret_cast<const void*>(sin), reinterpret_cast<void*>(out), rows, heads, dh, bf16,
                  num_threads);
      },
      py::arg("x"), py::arg("x_stride"), py::arg("cos"), py::arg("sin"), py::arg("out"), py::arg("rows"),
      py::arg("heads"), py::arg("dh"), py::arg("bf16"), py::arg("num_threads"));

  m.def(
      "store_kv_rows",
      [](uintptr_t k, int64_t k_stride, uintptr_t v, int64_t v_stride, uintptr_t k_cache, uintptr_t v_cache,
         uintptr_t slots, int64_t n, int64_t row, int64_t elem_size, int64_t num_slots, int num_threads) {
        py::gil_scoped_release release;
        mrt::store_kv_rows(reinterpret_cast<const void*>(k), k_stride, reinterpret_cast<const void*>(v), v_stride,
                           reinterpret_cast<void*>(k_cache), reinterpret_cast<void*>(v_cache),
                           reinterpret_cast<const int64_t*>(slots), n, row, elem_size, num_slots, num_threads);
      },
      py::arg("k"), py::arg("k_stride"), py::arg("v"), py::arg("v_stride"), py::arg("k_cache"), py::arg("v_cache"),
      py::arg("slots"), py::arg("n"), py::arg("row"), py::arg("elem_size"), py::arg("num_slots"),
      py::arg("num_threads") = 1);
}
