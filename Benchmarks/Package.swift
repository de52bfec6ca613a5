// swift-tools-version: 6.1
// Benchmarks for GuestMemfd, kept out of the root package so `swift test` does not
// build them. Run: swift run -c release --package-path Benchmarks gmem-bench
import PackageDescription

let package = Package(
    name: "GuestMemfdBenchmarks",
    dependencies: [.package(name: "GuestMemfd", path: "..")],
    targets: [
        .target(name: "CHeapStats"),
        .executableTarget(
            name: "gmem-bench",
            dependencies: [
                .product(name: "GMemModel", package: "GuestMemfd"),
                .product(name: "GMemScenario", package: "GuestMemfd"),
                .product(name: "GMemBackend", package: "GuestMemfd"),
                .product(name: "GMemKernel", package: "GuestMemfd"),
                .product(name: "GMemVMM", package: "GuestMemfd"),
                "CHeapStats",
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]),
    ]
)
