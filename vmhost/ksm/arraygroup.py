"""Named groups of arrays handed to compiled code as one reference (numba structrefs).

The compiled scan works on some 75 arrays (frames, rmap_items, stable nodes, scan state, the
VMA registry), passed as named groups so that code reads ``IT.head[item]``. A named tuple
would do that too, but numba passes a tuple by value, every member flattened into machine
arguments (seven per array), and re-packs it in every compiled helper it is passed to: a
helper taking four groups had some 500 arguments, and that, not the work it does, made up
most of the first run's compile time. A structref is one pointer to the arrays, whatever
their number, so a helper costs what its body costs to compile.

``group(name, fields, doc, module)`` makes a kind of group: a ``Group`` subclass (the
Python-side handle) and a ``GroupType`` subclass (its numba type) naming the fields. Every
kind is built in Python by one compiled function here (``cache=True``, one specialisation
per kind), which calls an intrinsic lowered in place, so building a group compiles nothing
else (numba's own structref constructor is a separate overload, compiled afresh in every
process).

``view`` makes an intrinsic that turns an address and a length into an array of a fixed
dtype: compiled code reaches arrays it is given by address this way (the VMA registry's
page tables), without numba's typed lists, whose methods are compiled in every process.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.experimental import structref
from numba.experimental.jitclass.base import imp_dtor
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array


class GroupType(types.StructRef):
    """The numba type of a group: its fields are the arrays' types (``FIELDS`` names them,
    in the order the group's constructor takes them)."""

    FIELDS: tuple[str, ...] = ()

    def preprocess_fields(self, fields):
        return tuple((name, types.unliteral(t)) for name, t in fields)


class Group(structref.StructRefProxy):
    """Base of the Python-side handles of groups (no attribute access from Python: groups
    are built in Python and read in compiled code). ``Kind(*arrays)`` packs the arrays, in
    the order of the type's ``FIELDS``."""

    __slots__ = ()
    _type_class: type[GroupType]

    def __new__(cls, *arrays):
        return _new(cls._type_class, arrays)


def group(name: str, fields, doc: str, module: str) -> tuple[type[Group], type[GroupType]]:
    """A new kind of group: its Python handle class ``name`` and its numba type class
    ``name + "Type"``, both to be bound under those names in ``module`` (numba's cache finds
    the type by its module and name)."""
    type_class = type(name + "Type", (GroupType,), {"FIELDS": tuple(fields), "__module__": module})
    proxy_class = type(name, (Group,), {"__slots__": (), "__doc__": doc, "__module__": module,
                                        "_type_class": type_class})
    structref.register(type_class)
    structref.define_boxing(type_class, proxy_class)
    return proxy_class, type_class


@intrinsic
def _pack(typingctx, type_ref, arrays):
    """A new group of the type class ``type_ref`` whose fields are the members of the tuple
    ``arrays``, in the order of its ``FIELDS``. Lowered in place (numba's own structref
    constructor is a separate overload, compiled afresh in every process)."""
    type_class = type_ref.instance_type
    fields = type_class.FIELDS
    if not isinstance(arrays, types.BaseTuple) or len(arrays) != len(fields):
        return None
    inst_type = type_class(list(zip(fields, arrays.types)))

    def codegen(context, builder, sig, args):
        # as structref.new allocates it (zeroed, its dtor drops the members), then filled
        data_type = inst_type.get_data_type()
        alloc_type = context.data_model_manager[data_type].get_value_type()
        meminfo = context.nrt.meminfo_alloc_dtor(
            builder, context.get_constant(types.uintp, context.get_abi_sizeof(alloc_type)),
            imp_dtor(context, builder.module, inst_type))
        data_ptr = builder.bitcast(context.nrt.meminfo_data(builder, meminfo),
                                   alloc_type.as_pointer())
        builder.store(cgutils.get_null_value(alloc_type), data_ptr)
        data = cgutils.create_struct_proxy(data_type)(context, builder, ref=data_ptr)
        for i, (name, ty) in enumerate(zip(fields, arrays.types)):
            value = builder.extract_value(args[1], i)
            context.nrt.incref(builder, ty, value)
            setattr(data, name, value)
        inst = context.make_helper(builder, inst_type)
        inst.meminfo = meminfo
        return inst._getvalue()

    return inst_type(type_ref, arrays), codegen


@njit(cache=True)
def _new(type_class, arrays):
    return _pack(type_class, arrays)


def view(dtype):
    """An intrinsic ``view_at(address, length)``: the 1-d C array of ``dtype`` (a numba
    type) of that many items at that address, holding no reference: whoever handed out the
    address keeps the memory alive for as long as compiled code may use it."""
    array_type = types.Array(dtype, 1, "C")

    @intrinsic
    def view_at(typingctx, address, length):
        if not (isinstance(address, types.Integer) and isinstance(length, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            intp = context.get_value_type(types.intp)
            addr = context.cast(builder, args[0], sig.args[0], types.intp)
            n = context.cast(builder, args[1], sig.args[1], types.intp)
            itemsize = context.get_abi_sizeof(context.get_data_type(dtype))
            ptr = builder.inttoptr(addr, context.get_data_type(dtype).as_pointer())
            ary = make_array(array_type)(context, builder)
            populate_array(ary, data=ptr, shape=[n], strides=[intp(itemsize)],
                           itemsize=intp(itemsize), meminfo=None)
            return ary._getvalue()

        return array_type(address, length), codegen

    return view_at


@intrinsic
def prefetch(typingctx, array, index):
    """``prefetch(array, index)``: start loading the cache line of ``array[index]`` (no
    bounds check and no fault: a hint to the CPU, for reads a loop will make a few
    iterations later at an address it already knows)."""
    if not (isinstance(array, types.Array) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ary = make_array(sig.args[0])(context, builder, args[0])
        i = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [i], wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])   # read, keep, data
        return context.get_dummy_value()

    return types.void(array, index), codegen
