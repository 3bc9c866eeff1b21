/*
 * TensorRT IPluginV3 plugins of the DPA prototype-attention ops: shapes, types, fields; the math is in
 * the kernels behind dpa_kernels.h. Uses TensorRT enum names only (no integer values), so the same source
 * builds against the headers of TensorRT 10.x and 11.x.
 */
#include "dpa_plugins.h"

#include <NvInferVersion.h>

#include <cmath>
#include <exception>
#include <mutex>
#include <sstream>
#include <string>

using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::ILogger;
using nvinfer1::IPluginCapability;
using nvinfer1::IPluginCreatorInterface;
using nvinfer1::IPluginV3;
using nvinfer1::PluginCapabilityType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;
using nvinfer1::TensorRTPhase;

namespace dpa
{
namespace plugins
{
namespace
{

char const* const kPluginVersion = "1";
char const* const kPluginNamespace = "";
char const* const kEpsilon = "epsilon";
char const* const kScale = "scale";

struct OpInfo
{
    char const* name;
    int32_t nbInputs;
    int32_t nbOutputs;
    bool hasEpsilon;
    bool hasScale;
};

OpInfo const& info(Op op)
{
    static OpInfo const kInfo[] = {
        {"DpaPrototypes", 1, 1, false, false},
        {"DpaPrototypeCorrelation", 1, 1, true, false},
        {"DpaCrossModalAttention", 4, 2, false, true},
        {"DpaPrototypeMemoryRead", 4, 1, true, true},
    };
    return kInfo[static_cast<int32_t>(op)];
}

constexpr int32_t kValidInput = 3; // DpaPrototypeMemoryRead: features, keys, values, valid

class Logger
{
public:
    void setFinder(nvinfer1::ILoggerFinder* finder)
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (mFinder == nullptr && finder != nullptr)
        {
            mFinder = finder;
        }
    }

    void log(ILogger::Severity severity, std::string const& message)
    {
        std::lock_guard<std::mutex> lock(mMutex);
        ILogger* logger = mFinder != nullptr ? mFinder->findLogger() : nullptr;
        if (logger != nullptr)
        {
            logger->log(severity, ("[dpa_plugins] " + message).c_str());
        }
    }

private:
    std::mutex mMutex;
    nvinfer1::ILoggerFinder* mFinder{nullptr};
};

Logger& logger()
{
    static Logger instance;
    return instance;
}

// Logs through the application's logger (when it gave one); a failure to log is not reported further.
void logError(Op op, std::string const& message) noexcept
{
    try
    {
        logger().log(ILogger::Severity::kERROR, std::string(info(op).name) + ": " + message);
    }
    catch (std::exception const&)
    {
    }
}

bool isFloatType(DataType type)
{
    return type == DataType::kFLOAT || type == DataType::kHALF;
}

int32_t toKernelDtype(DataType type)
{
    return type == DataType::kHALF ? DPA_DTYPE_FLOAT16 : DPA_DTYPE_FLOAT32;
}

std::string shapeString(nvinfer1::Dims const& dims)
{
    std::ostringstream text;
    text << "(";
    for (int32_t i = 0; i < dims.nbDims; ++i)
    {
        text << (i > 0 ? ", " : "") << dims.d[i];
    }
    text << ")";
    return text.str();
}

// The sizes of one call: X (B, D, HW); memory (B, N, T, D) for the memory read.
struct Sizes
{
    int64_t batch{0};
    int64_t dim{0};
    int64_t positions{0};
    int64_t slots{0};
    int64_t tokens{0};
};

// Checks the input shapes of `op` and returns its sizes; an empty string when consistent.
std::string checkShapes(Op op, nvinfer1::Dims const* dims, int32_t nbInputs, Sizes& sizes)
{
    OpInfo const& opInfo = info(op);
    if (nbInputs != opInfo.nbInputs)
    {
        return "expects " + std::to_string(opInfo.nbInputs) + " inputs, got " + std::to_string(nbInputs);
    }
    if (dims[0].nbDims != 3)
    {
        return "input 0 must be (B, C, HW), got " + shapeString(dims[0]);
    }
    sizes.batch = dims[0].d[0];
    sizes.dim = dims[0].d[1];
    sizes.positions = dims[0].d[2];
    if (op == Op::kCrossModalAttention)
    {
        for (int32_t i = 1; i < 4; ++i)
        {
            if (dims[i].nbDims != 3 || dims[i].d[0] != sizes.batch || dims[i].d[1] != sizes.dim
                || dims[i].d[2] != sizes.positions)
            {
                return "keys and values must all be " + shapeString(dims[0]) + ", input " + std::to_string(i)
                    + " is " + shapeString(dims[i]);
            }
        }
    }
    if (op == Op::kPrototypeMemoryRead)
    {
        nvinfer1::Dims const& keys = dims[1];
        if (keys.nbDims != 4 || keys.d[0] != sizes.batch || keys.d[3] != sizes.dim)
        {
            return "memory keys must be (B, N, T, D) with B, D of the features " + shapeString(dims[0]) + ", got "
                + shapeString(keys);
        }
        sizes.slots = keys.d[1];
        sizes.tokens = keys.d[2];
        nvinfer1::Dims const& values = dims[2];
        if (values.nbDims != 4 || values.d[0] != keys.d[0] || values.d[1] != keys.d[1] || values.d[2] != keys.d[2]
            || values.d[3] != keys.d[3])
        {
            return "memory values " + shapeString(values) + " must have the shape of the keys " + shapeString(keys);
        }
        nvinfer1::Dims const& valid = dims[kValidInput];
        if (valid.nbDims != 2 || valid.d[0] != sizes.batch || valid.d[1] != sizes.slots)
        {
            return "valid must be (B, N) = (" + std::to_string(sizes.batch) + ", " + std::to_string(sizes.slots)
                + "), got " + shapeString(valid);
        }
    }
    return std::string();
}

// checkShapes for the noexcept plugin methods: logs the problem, false when the shapes are inconsistent.
bool validShapes(Op op, nvinfer1::Dims const* dims, int32_t nbInputs, Sizes& sizes) noexcept
{
    try
    {
        std::string const problem = checkShapes(op, dims, nbInputs, sizes);
        if (problem.empty())
        {
            return true;
        }
        logError(op, problem);
    }
    catch (std::exception const& error)
    {
        logError(op, std::string("shape check failed: ") + error.what());
    }
    return false;
}

float defaultScale(Op op, Sizes const& sizes)
{
    int64_t const length = op == Op::kCrossModalAttention ? sizes.positions : sizes.dim;
    return 1.0F / std::sqrt(static_cast<float>(length));
}

size_t workspaceSize(Op op, Sizes const& sizes)
{
    switch (op)
    {
    case Op::kPrototypes: return dpa_prototypes_workspace_size(sizes.batch, sizes.dim, sizes.positions);
    case Op::kPrototypeCorrelation:
        return dpa_prototype_correlation_workspace_size(sizes.batch, sizes.dim, sizes.positions);
    case Op::kCrossModalAttention:
        return dpa_cross_modal_attention_workspace_size(sizes.batch, sizes.dim, sizes.positions);
    case Op::kPrototypeMemoryRead:
        return dpa_prototype_memory_read_workspace_size(
            sizes.batch, sizes.dim, sizes.positions, sizes.slots, sizes.tokens);
    }
    return 0;
}

// Reads a float32 (or float64) scalar field.
bool readFloat(PluginField const& field, float& value)
{
    if (field.data == nullptr || field.length != 1)
    {
        return false;
    }
    if (field.type == PluginFieldType::kFLOAT32)
    {
        value = *static_cast<float const*>(field.data);
        return true;
    }
    if (field.type == PluginFieldType::kFLOAT64)
    {
        value = static_cast<float>(*static_cast<double const*>(field.data));
        return true;
    }
    return false;
}

} // namespace

DpaPlugin::DpaPlugin(Op op, Attributes const& attributes)
    : mOp(op)
    , mAttributes(attributes)
{
}

// The serialised-field pointers refer to the source object: a copy rebuilds its own.
DpaPlugin::DpaPlugin(DpaPlugin const& other)
    : DpaPlugin(other.mOp, other.mAttributes)
{
}

IPluginCapability* DpaPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* DpaPlugin::clone() noexcept
{
    try
    {
        return new DpaPlugin(*this);
    }
    catch (std::exception const& error)
    {
        logError(mOp, std::string("clone failed: ") + error.what());
    }
    return nullptr;
}

char const* DpaPlugin::getPluginName() const noexcept
{
    return info(mOp).name;
}

char const* DpaPlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* DpaPlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t DpaPlugin::getNbOutputs() const noexcept
{
    return info(mOp).nbOutputs;
}

int32_t DpaPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept
{
    if (in == nullptr || nbInputs != info(mOp).nbInputs || nbOutputs != info(mOp).nbOutputs)
    {
        logError(mOp, "wrong number of inputs or outputs");
        return -1;
    }
    return 0;
}

int32_t DpaPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != info(mOp).nbOutputs
        || nbInputs != info(mOp).nbInputs)
    {
        return -1;
    }
    for (int32_t i = 0; i < nbOutputs; ++i)
    {
        outputTypes[i] = inputTypes[0];
    }
    return 0;
}

int32_t DpaPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
    DimsExprs* outputs, int32_t nbOutputs, nvinfer1::IExprBuilder&) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != info(mOp).nbInputs
        || nbOutputs != info(mOp).nbOutputs || inputs[0].nbDims != 3)
    {
        logError(mOp, "input 0 must be (B, C, HW)");
        return -1;
    }
    for (int32_t i = 0; i < nbOutputs; ++i)
    {
        outputs[i] = inputs[0]; // (B, C, HW)
    }
    if (mOp == Op::kPrototypes)
    {
        outputs[0].d[2] = inputs[0].d[1]; // (B, C, C)
    }
    return 0;
}

bool DpaPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == 0)
    {
        return isFloatType(desc.type);
    }
    DataType const ioType = inOut[0].desc.type;
    if (mOp == Op::kPrototypeMemoryRead && pos == kValidInput)
    {
        return desc.type == DataType::kFLOAT || desc.type == ioType;
    }
    return desc.type == ioType;
}

size_t DpaPlugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t) const noexcept
{
    if (inputs == nullptr || nbInputs != info(mOp).nbInputs)
    {
        return 0;
    }
    // The workspace grows with every size: the largest shape of the profile bounds it.
    nvinfer1::Dims largest[4];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        largest[i] = inputs[i].max;
    }
    Sizes sizes;
    return validShapes(mOp, largest, nbInputs, sizes) ? workspaceSize(mOp, sizes) : 0;
}

int32_t DpaPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*, int32_t) noexcept
{
    if (in == nullptr || nbInputs != info(mOp).nbInputs)
    {
        return -1;
    }
    nvinfer1::Dims dims[4];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims[i] = in[i].dims;
    }
    Sizes sizes;
    return validShapes(mOp, dims, nbInputs, sizes) ? 0 : -1;
}

int32_t DpaPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
    void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    nvinfer1::Dims dims[4];
    for (int32_t i = 0; i < info(mOp).nbInputs; ++i)
    {
        dims[i] = inputDesc[i].dims;
    }
    Sizes sizes;
    if (!validShapes(mOp, dims, info(mOp).nbInputs, sizes))
    {
        return -1;
    }
    int32_t const dtype = toKernelDtype(inputDesc[0].type);
    float const scale = mAttributes.hasScale ? mAttributes.scale : defaultScale(mOp, sizes);
    size_t const workspaceBytes = workspaceSize(mOp, sizes);
    int32_t status = DPA_STATUS_INVALID_ARGUMENT;
    switch (mOp)
    {
    case Op::kPrototypes:
        status = dpa_prototypes(inputs[0], outputs[0], sizes.batch, sizes.dim, sizes.positions, dtype, workspace,
            workspaceBytes, stream);
        break;
    case Op::kPrototypeCorrelation:
        status = dpa_prototype_correlation(inputs[0], outputs[0], sizes.batch, sizes.dim, sizes.positions,
            mAttributes.epsilon, dtype, workspace, workspaceBytes, stream);
        break;
    case Op::kCrossModalAttention:
        status = dpa_cross_modal_attention(inputs[0], inputs[1], inputs[2], inputs[3], outputs[0], outputs[1],
            sizes.batch, sizes.dim, sizes.positions, scale, dtype, workspace, workspaceBytes, stream);
        break;
    case Op::kPrototypeMemoryRead:
        status = dpa_prototype_memory_read(inputs[0], inputs[1], inputs[2], inputs[kValidInput], outputs[0],
            sizes.batch, sizes.dim, sizes.positions, sizes.slots, sizes.tokens, scale, mAttributes.epsilon, dtype,
            toKernelDtype(inputDesc[kValidInput].type), workspace, workspaceBytes, stream);
        break;
    }
    if (status == DPA_STATUS_SUCCESS)
    {
        return 0;
    }
    try
    {
        std::string message = std::string("kernel failed: ") + dpa_status_string(status);
        if (status == DPA_STATUS_CUDA_ERROR)
        {
            message += std::string(" (") + cudaGetErrorString(static_cast<cudaError_t>(dpa_last_cuda_error())) + ")";
        }
        logError(mOp, message);
    }
    catch (std::exception const&)
    {
        logError(mOp, "kernel failed");
    }
    return -1;
}

IPluginV3* DpaPlugin::attachToContext(nvinfer1::IPluginResourceContext*) noexcept
{
    return clone();
}

PluginFieldCollection const* DpaPlugin::getFieldsToSerialize() noexcept
{
    int32_t count = 0;
    if (info(mOp).hasEpsilon)
    {
        mSerializedFields[count++] = PluginField(kEpsilon, &mAttributes.epsilon, PluginFieldType::kFLOAT32, 1);
    }
    if (info(mOp).hasScale && mAttributes.hasScale)
    {
        mSerializedFields[count++] = PluginField(kScale, &mAttributes.scale, PluginFieldType::kFLOAT32, 1);
    }
    mSerializedCollection.nbFields = count;
    mSerializedCollection.fields = mSerializedFields.data();
    return &mSerializedCollection;
}

DpaPluginCreator::DpaPluginCreator(Op op)
    : mOp(op)
{
    if (info(op).hasScale)
    {
        mFields.emplace_back(kScale, nullptr, PluginFieldType::kFLOAT32, 1);
    }
    if (info(op).hasEpsilon)
    {
        mFields.emplace_back(kEpsilon, nullptr, PluginFieldType::kFLOAT32, 1);
    }
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginV3* DpaPluginCreator::createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept
{
    try
    {
        Attributes attributes;
        OpInfo const& opInfo = info(mOp);
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& field = fc->fields[i];
            std::string const name = field.name != nullptr ? field.name : "";
            bool const known = (opInfo.hasEpsilon && name == kEpsilon) || (opInfo.hasScale && name == kScale);
            if (!known)
            {
                logError(mOp, "unknown attribute '" + name + "'");
                return nullptr;
            }
            float value = 0.0F;
            if (!readFloat(field, value) || !std::isfinite(value))
            {
                logError(mOp, "attribute '" + name + "' must be one finite float32");
                return nullptr;
            }
            if (name == kEpsilon)
            {
                if (!(value > 0.0F))
                {
                    logError(mOp, "epsilon must be > 0, got " + std::to_string(value));
                    return nullptr;
                }
                attributes.epsilon = value;
            }
            else
            {
                attributes.scale = value;
                attributes.hasScale = true;
            }
        }
        return new DpaPlugin(mOp, attributes);
    }
    catch (std::exception const& error)
    {
        logError(mOp, std::string("createPlugin failed: ") + error.what());
    }
    return nullptr;
}

PluginFieldCollection const* DpaPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

char const* DpaPluginCreator::getPluginName() const noexcept
{
    return info(mOp).name;
}

char const* DpaPluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* DpaPluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

} // namespace plugins
} // namespace dpa

extern "C"
{
    IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
    {
        using dpa::plugins::DpaPluginCreator;
        using dpa::plugins::Op;
        static DpaPluginCreator prototypes(Op::kPrototypes);
        static DpaPluginCreator prototypeCorrelation(Op::kPrototypeCorrelation);
        static DpaPluginCreator crossModalAttention(Op::kCrossModalAttention);
        static DpaPluginCreator prototypeMemoryRead(Op::kPrototypeMemoryRead);
        static IPluginCreatorInterface* const creators[]
            = {&prototypes, &prototypeCorrelation, &crossModalAttention, &prototypeMemoryRead};
        nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
        return creators;
    }

    void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
    {
        dpa::plugins::logger().setFinder(finder);
    }

    int32_t dpa_tensorrt_major(void)
    {
        return NV_TENSORRT_MAJOR;
    }
}
