/*
 * TensorRT IPluginV3 plugins of the DPA prototype-attention ops (SPEC §4.2), for TensorRT 10.x and 11.x.
 *
 * Four plugins, one per custom ONNX op of domain `trt.plugins` (see export/reference.py OP_SPECS):
 *   DpaPrototypes, DpaPrototypeCorrelation, DpaCrossModalAttention, DpaPrototypeMemoryRead;
 * plugin version "1", namespace ""; PluginField names are the ONNX attribute names (float32 scalars).
 * The kernels are those of dpa_kernels.h. The library exports getCreators() and setLoggerFinder() with C
 * linkage, so `trtexec --dynamicPlugins=libdpa_plugins.so` and IPluginRegistry::loadLibrary() find them, and
 * dpa_tensorrt_major(): the plugin interfaces differ between TensorRT majors, so a loader checks it first.
 */
#ifndef DPA_PLUGINS_H
#define DPA_PLUGINS_H

#include <array>
#include <cstdint>
#include <vector>

#include <NvInferRuntime.h>

#include "dpa_kernels.h"

namespace dpa
{
namespace plugins
{

enum class Op : int32_t
{
    kPrototypes = 0,
    kPrototypeCorrelation = 1,
    kCrossModalAttention = 2,
    kPrototypeMemoryRead = 3,
};

// The constants of an op node (ONNX attributes = plugin fields).
struct Attributes
{
    float epsilon{1e-6F}; // L2 normalisation floor (correlation ops)
    float scale{0.0F};    // logit scale; used only when hasScale (else 1/sqrt(HW) or 1/sqrt(D), the model's)
    bool hasScale{false};
};

/*
 * One plugin class serves the four ops; `op` selects the op's name, inputs, outputs and kernel.
 * Format combinations: linear (row-major) layout; all float tensors one type, float32 or float16;
 * the `valid` input of DpaPrototypeMemoryRead float32 or that same type.
 */
class DpaPlugin : public nvinfer1::IPluginV3,
                  public nvinfer1::IPluginV3OneCore,
                  public nvinfer1::IPluginV3OneBuild,
                  public nvinfer1::IPluginV3OneRuntime
{
public:
    DpaPlugin(Op op, Attributes const& attributes);
    DpaPlugin(DpaPlugin const& other);
    DpaPlugin& operator=(DpaPlugin const&) = delete;
    ~DpaPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    Op mOp;
    Attributes mAttributes;
    std::array<nvinfer1::PluginField, 2> mSerializedFields{}; // epsilon, scale: pointers into mAttributes
    nvinfer1::PluginFieldCollection mSerializedCollection{};
};

class DpaPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    explicit DpaPluginCreator(Op op);
    ~DpaPluginCreator() override = default;

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    Op mOp;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace plugins
} // namespace dpa

extern "C"
{
    // The plugin creators of this library (TensorRT's dynamic plugin-library entry point).
    DPA_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
    // Lets the plugins log through the application's ILogger.
    DPA_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
    // NV_TENSORRT_MAJOR of the headers this library was built against. TensorRT's plugin interfaces change
    // between majors (11.1: ILoggerFinder derives from IVersionedInterface), so a library built for another
    // major loads but crashes when a plugin logs: loaders compare this with the running TensorRT first.
    DPA_API int32_t dpa_tensorrt_major(void);
}

#endif // DPA_PLUGINS_H
