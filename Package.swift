// swift-tools-version: 6.1
//
// GuestMemfd: Linux KVM guest_memfd, executable in user space.
//
// Targets mirror the system's parts:
//   GMemBackend   the uapi vocabulary (errnos, flags, exits) and the Backend protocol
//                 that the scenario runner, the VMM side and tests talk to.
//   GMemModel     the model of the kernel side: ranges, pages, guest_memfd, KVM, host mm.
//   GMemScenario  scenario files: JSON, parsing with precise errors, the runner.
//   gmem          the command line.
// Benchmarks live in the nested package Benchmarks/ so `swift test` does not build them.
import PackageDescription

let swift6: [SwiftSetting] = [.swiftLanguageMode(.v6)]

let package = Package(
    name: "GuestMemfd",
    products: [
        .executable(name: "gmem", targets: ["gmem"]),
        .library(name: "GMemBackend", targets: ["GMemBackend"]),
        .library(name: "GMemModel", targets: ["GMemModel"]),
        .library(name: "GMemScenario", targets: ["GMemScenario"]),
        .library(name: "GMemKernel", targets: ["GMemKernel"]),
        .library(name: "GMemVMM", targets: ["GMemVMM"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/x-sheep/swift-property-based", from: "2.0.0"),
    ],
    targets: [
        .target(name: "GMemBackend", swiftSettings: swift6),
        .target(name: "GMemModel", dependencies: ["GMemBackend"], swiftSettings: swift6),
        .target(name: "GMemScenario", dependencies: ["GMemBackend", "GMemModel", "GMemVMM"], swiftSettings: swift6),
        // The VMM side: conversion management over any backend.
        .target(name: "GMemVMM", dependencies: ["GMemBackend", "GMemModel"], swiftSettings: swift6),
        // Linux only: ioctl numbers, uapi structs, variadic calls and signal-safe probes in C,
        // and the kernel backend in Swift over them.
        .target(name: "CKVM", cSettings: [.define("_GNU_SOURCE")]),
        .target(
            name: "GMemKernel",
            dependencies: ["GMemBackend", .target(name: "CKVM", condition: .when(platforms: [.linux]))],
            swiftSettings: swift6),
        .executableTarget(
            name: "gmem",
            dependencies: [
                "GMemBackend", "GMemModel", "GMemScenario", "GMemKernel",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: swift6),
        .testTarget(
            name: "GuestMemfdTests",
            dependencies: [
                "GMemBackend", "GMemModel", "GMemScenario", "GMemKernel", "GMemVMM",
                .target(name: "CKVM", condition: .when(platforms: [.linux])),
                .product(name: "PropertyBased", package: "swift-property-based"),
            ],
            swiftSettings: swift6),
    ]
)
