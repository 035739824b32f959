# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if header :contains "received" "client.example.org" {
  fileinto "yes";
} else {
  fileinto "no";
}
