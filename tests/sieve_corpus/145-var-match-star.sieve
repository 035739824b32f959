# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "variables"];
if header :matches "list-id" "*<*.lists.example.com>" {
  fileinto "lists/${2}";
}
