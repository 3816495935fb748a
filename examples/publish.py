import asyncio
import json

async def publish_message():
    reader, writer = await asyncio.open_connection('localhost', 8888)
    msg = json.dumps({"action": "publish", "topic": "news", "message": "Hello, world!"})
    writer.write(msg.encode())
    await writer.drain()
    data = await reader.read(1024)
    print("ACK:", data.decode())
    writer.close()
    await writer.wait_closed()

asyncio.run(publish_message())
